"""Shared fixtures: the tiny demo model, built once per test session, small datasets, and a real
`gpt-service serve` process on a workspace of its own."""

from __future__ import annotations

import json
import os
import re
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
from prometheus_client.parser import text_string_to_metric_families

from gpt_service.demo_model import build_demo_model
from tests.postgres import PostgresServer, missing_postgres, postgres_bin

REPO = Path(__file__).resolve().parent.parent

QA_PAIRS = [
    ("你好", "你好！有什么可以帮助你的吗？"),
    ("介绍一下Python", "Python是一种高级编程语言，简洁易读。"),
    ("什么是LoRA", "LoRA是一种低秩适配方法。"),
    ("1加1等于几", "1加1等于2。"),
    ("Hello", "Hello! How can I help you today?"),
    ("What is the capital of France?", "Paris."),
    ("谢谢", "不客气！"),
    ("Say goodbye", "Goodbye! Have a nice day."),
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run where CUDA is (`pytest -m gpu`); elsewhere they are deselected, not skipped."""
    import torch

    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tokenized-data cache of this session (the servers' and trainings' child processes inherit it),
    so that tests never read or fill the user's own cache."""
    folder = tmp_path_factory.mktemp("tokenized")
    before = os.environ.get("GPT_SERVICE_DATA_CACHE")
    os.environ["GPT_SERVICE_DATA_CACHE"] = str(folder)
    yield folder
    if before is None:
        del os.environ["GPT_SERVICE_DATA_CACHE"]
    else:
        os.environ["GPT_SERVICE_DATA_CACHE"] = before


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("models") / "tiny-qwen2")


def write_json(path: Path, payload: object) -> Path:
    path.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def qa_prompt(question: str) -> str:
    return f"用户：{question}\n助手："


@pytest.fixture
def qa_records() -> list[dict]:
    return [{"prompt": qa_prompt(q), "completion": a} for q, a in QA_PAIRS]


@pytest.fixture
def text_records() -> list[dict]:
    return [{"text": qa_prompt(q) + a} for q, a in QA_PAIRS]


# -- a real server ------------------------------------------------------------------------------

SPEC_MODEL_ID = "Qwen/Qwen2-7B-Instruct"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def on_port(code: str, port: int) -> str:
    """Documentation code, which talks to the default port 8000, talking to a test server's port instead."""
    return re.sub(r"\b(localhost|127\.0\.0\.1):8000\b", f"127.0.0.1:{port}", code)


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

    def wait_for_step(self, task_id: str, step: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while requests.get(f"{self.url}/train/status/{task_id}", timeout=10).json()["current_step"] < step:
            assert time.monotonic() < deadline, f"task {task_id} did not reach step {step}"
            time.sleep(0.1)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of the server's Prometheus metric `name` that carry `labels`."""
        families = text_string_to_metric_families(requests.get(f"{self.url}/metrics", timeout=10).text)
        return sum(sample.value for family in families if family.name == name for sample in family.samples
                   if sample.name in (name, f"{name}_total") and labels.items() <= sample.labels.items())

    def wait_for(self, task_id: str, statuses: tuple[str, ...], timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = requests.get(f"{self.url}/train/status/{task_id}", timeout=10).json()
            if status["status"] in statuses:
                return status
            time.sleep(0.2)
        raise TimeoutError(f"task {task_id} still {status['status']}")


def rank_pid(marker: str, rank: int) -> int | None:
    """The pid of the training rank whose command line holds `marker`."""
    for proc in Path("/proc").iterdir():
        try:
            if (marker.encode() in (proc / "cmdline").read_bytes()
                    and f"\0RANK={rank}\0".encode() in b"\0" + (proc / "environ").read_bytes()
                    and b"\0LOCAL_RANK=" in b"\0" + (proc / "environ").read_bytes()):
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


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


def server_environment(hub_cache: Path, **settings: str) -> dict[str, str]:
    """This process's environment without its GPT_SERVICE_ settings (but the data cache), offline on `hub_cache`,
    plus `settings`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GPT_SERVICE_") or k == "GPT_SERVICE_DATA_CACHE"}
    return {**env, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", **settings}


@pytest.fixture
def server_env(hub_cache: Path) -> dict[str, str]:
    return server_environment(hub_cache)


@pytest.fixture
def server(workspace: Path, server_env: dict[str, str]) -> Iterator[Server]:
    srv = Server(workspace, free_port(), server_env).start()
    yield srv
    srv.stop()


# -- task databases: a real PostgreSQL server, and SQLite files ---------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = postgres_bin()
    if bin_dir is None:
        missing_postgres()
    server = PostgresServer(bin_dir, free_port()).start()  # type: ignore[arg-type]
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    with postgres_server.database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on a SQLite file (one host) and on a PostgreSQL database (several hosts)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tasks.db'}"
    return request.getfixturevalue("postgres_url")
