"""A real `gpt-service serve` process on a workspace of its own, with the tiny model and a dataset."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import QA_PAIRS, qa_prompt, write_json

SPEC_MODEL_ID = "Qwen/Qwen2-7B-Instruct"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def install_in_hub_cache(model_dir: Path, cache: Path, repo_id: str) -> None:
    """Lay a local model out as the Hugging Face cache does, so `repo_id` resolves offline."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


class Server:
    def __init__(self, workspace: Path, port: int, env: dict[str, str], extra_args: tuple[str, ...] = ()) -> None:
        self.workspace, self.port, self.env, self.extra_args = workspace, port, env, extra_args
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> Server:
        log = open(self.workspace / f"server-{self.port}.log", "ab")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gpt_service.cli", "serve", "--workspace", str(self.workspace),
             "--port", str(self.port), *self.extra_args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.workspace / f"server-{self.port}.log").read_text()
            try:
                if requests.get(f"{self.url}/health", timeout=1).ok:
                    return self
            except requests.ConnectionError:
                time.sleep(0.2)
        raise TimeoutError("server did not start")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def wait_for(self, task_id: str, statuses: tuple[str, ...], timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = requests.get(f"{self.url}/train/status/{task_id}", timeout=10).json()
            if status["status"] in statuses:
                return status
            time.sleep(0.2)
        raise TimeoutError(f"task {task_id} still {status['status']}")


@pytest.fixture(scope="session")
def hub_cache(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("hf-cache")
    install_in_hub_cache(tiny_model, cache, SPEC_MODEL_ID)
    return cache


def make_workspace(root: Path, tiny_model: Path) -> Path:
    (root / "data").mkdir(parents=True)
    shutil.copytree(tiny_model, root / "models" / "tiny")
    write_json(root / "data" / "train.json", [{"text": qa_prompt(q) + a} for q, a in QA_PAIRS] * 4)
    return root


@pytest.fixture
def workspace(tmp_path: Path, tiny_model: Path) -> Path:
    return make_workspace(tmp_path / "ws", tiny_model)


@pytest.fixture
def server_env(hub_cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPT_SERVICE_")}
    return {**env, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def server(workspace: Path, server_env: dict[str, str]) -> Iterator[Server]:
    srv = Server(workspace, free_port(), server_env).start()
    yield srv
    srv.stop()
