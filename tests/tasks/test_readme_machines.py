"""The README's "Several machines" commands, run as written against a real PostgreSQL: one API server
without a worker and two workers; a training submitted to the API completes on one of the workers.

The one substitution is the database: the README's URL names a database host, the test its own server.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, free_port, make_workspace, server_environment
from tests.tasks.cluster import TRAINING, wait_until

SECTION = re.compile(r"^## Several machines\n(.*?)^## ", re.DOTALL | re.MULTILINE)
BLOCK = re.compile(r"```sh\n(.*?)```", re.DOTALL)


def several_machines_commands() -> tuple[dict[str, str], list[str]]:
    """The section's exported settings and its commands, in order."""
    section = SECTION.search((REPO / "README.md").read_text(encoding="utf-8"))
    assert section, "README.md has no 'Several machines' section"
    blocks = BLOCK.findall(section.group(1))
    assert len(blocks) == 1
    exports, commands = {}, []
    for line in blocks[0].splitlines():
        if line.startswith("export "):
            name, value = line.removeprefix("export ").split("=", 1)
            exports[name] = value
        elif line.strip():
            commands.append(line)
    return exports, commands


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        process.send_signal(signal.SIGTERM)
    for process in started:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.mark.slow
def test_the_several_machines_commands_run_as_written(postgres_url: str, tmp_path: Path, tiny_model: Path,
                                                     hub_cache: Path, processes: list[subprocess.Popen]) -> None:
    exports, commands = several_machines_commands()
    assert set(exports) == {"GPT_SERVICE_DATABASE_URL", "GPT_SERVICE_API_KEY"}
    assert any("serve" in c and "--no-worker" in c for c in commands)
    assert sum("gpt-service worker" in c for c in commands) == 2
    workspace = make_workspace(tmp_path / "checkout", tiny_model)
    (workspace / ".venv").symlink_to(REPO / ".venv")
    port = free_port()
    settings = exports | {"GPT_SERVICE_DATABASE_URL": postgres_url, "GPT_SERVICE_PORT": str(port)}
    env = server_environment(hub_cache, **settings, OMP_NUM_THREADS="1")
    for i, command in enumerate(commands):
        log = open(workspace / f"machine-{i}.log", "ab")  # noqa: SIM115 - lives with the process
        processes.append(subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=workspace, env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {exports['GPT_SERVICE_API_KEY']}"}

    def answers() -> bool:
        assert all(p.poll() is None for p in processes), [p.args for p in processes if p.poll() is not None]
        try:
            return requests.get(f"{url}/health", timeout=2).ok
        except requests.ConnectionError:
            return False

    wait_until(answers, 60, "the API server")
    names = {shlex.split(c)[-1] for c in commands if "gpt-service worker" in c}

    def workers_alive() -> bool:
        listed = requests.get(f"{url}/workers", headers=auth, timeout=10).json()["workers"]
        return {w["name"] for w in listed if w["alive"]} == names

    wait_until(workers_alive, 60, "both workers")
    body = TRAINING | {"output_dir": "models/shared", "num_epochs": 2}
    task_id = requests.post(f"{url}/train", json=body, headers=auth, timeout=30).json()["task_id"]

    def finished() -> dict | None:
        status = requests.get(f"{url}/train/status/{task_id}", headers=auth, timeout=10).json()
        return status if status["status"] in ("completed", "failed", "cancelled") else None

    wait_until(finished, 180, "the training")
    status = finished()
    assert status is not None and status["status"] == "completed", status
    assert status["worker"] in names
    assert (workspace / "models/shared/lora_adapter/adapter_model.safetensors").is_file()
    assert os.environ.get("GPT_SERVICE_DATABASE_URL") != postgres_url  # the test's process itself is untouched
