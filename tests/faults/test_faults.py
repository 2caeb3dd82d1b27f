"""Faults that lose nothing: killed trainers, full disks, cancels mid-save, racing submissions, many writers.

Each case runs against a real server process. What cannot be produced for real on demand (a kill
exactly inside a save, a full disk where no tmpfs can be mounted) is injected by
tests/faults/inject/sitecustomize.py, loaded through PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file

from gpt_service.training.checkpoints import list_checkpoints, publish_atomically
from tests.conftest import Server, free_port

pytestmark = pytest.mark.slow  # end-to-end: real servers, scripts and trainings

INJECT = Path(__file__).parent / "inject"
LONG_RUN = {"base_model": "models/tiny", "dataset_path": "data/train.json", "num_epochs": 50, "save_steps": 5,
            "batch_size": 4}


def start(workspace: Path, env: dict[str, str], **extra: str) -> Server:
    paths = [str(INJECT), *filter(None, [env.get("PYTHONPATH")])]
    return Server(workspace, free_port(), env | {"PYTHONPATH": os.pathsep.join(paths), **extra}).start()


@pytest.fixture
def save_log(tmp_path: Path) -> Path:
    return tmp_path / "saves.log"


@pytest.fixture
def slow_saves(workspace: Path, server_env: dict[str, str], save_log: Path) -> Iterator[Server]:
    server = start(workspace, server_env, GPT_SERVICE_TEST_SAVE_LOG=str(save_log), GPT_SERVICE_TEST_SAVE_SECONDS="4")
    yield server
    server.stop()


def wait_until(predicate: Callable[[], bool], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def runner_pid(task_id: str) -> int:
    out = subprocess.run(["pgrep", "-f", f"gpt_service.tasks.runner {task_id}"], capture_output=True, text=True)
    return int(out.stdout.split()[0])


def saves_started(save_log: Path) -> int:
    return len(save_log.read_text().splitlines()) if save_log.exists() else 0


def assert_checkpoint_loads(folder: Path) -> None:
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] > 0
    assert load_file(folder / "adapter_model.safetensors")
    torch.load(folder / "optimizer.pt", weights_only=True)


def test_kill_9_of_the_trainer_during_a_save_keeps_the_previous_checkpoint(slow_saves: Server,
                                                                           save_log: Path) -> None:
    out = slow_saves.workspace / "models/killed"
    task_id = requests.post(f"{slow_saves.url}/train", json=LONG_RUN | {"output_dir": "models/killed"},
                            timeout=30).json()["task_id"]
    wait_until(lambda: saves_started(save_log) >= 2)  # the first checkpoint is published, the second is mid-save
    os.kill(runner_pid(task_id), signal.SIGKILL)
    status = slow_saves.wait_for(task_id, ("failed",))
    assert "killed by SIGKILL" in status["error"]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-5"]
    assert_checkpoint_loads(out / "checkpoint-5")
    debris = list(out.glob(".checkpoint-10.tmp-*"))
    assert debris, "the interrupted save was left unpublished"
    assert not (out / "lora_adapter").exists()

    resumed = requests.post(f"{slow_saves.url}/train/{task_id}/resume", timeout=10).json()
    assert resumed["status"] == "pending"
    wait_until(lambda: saves_started(save_log) >= 3)  # the resumed run is saving its step 10 again
    assert not any(d.exists() for d in debris), "a resumed run clears unfinished writes"
    requests.post(f"{slow_saves.url}/train/{task_id}/cancel", timeout=10)


def test_cancel_during_a_save_ends_cancelled_with_whole_checkpoints(slow_saves: Server, save_log: Path) -> None:
    task_id = requests.post(f"{slow_saves.url}/train", json=LONG_RUN | {"output_dir": "models/cancelled"},
                            timeout=30).json()["task_id"]
    wait_until(lambda: saves_started(save_log) >= 1)
    assert requests.post(f"{slow_saves.url}/train/{task_id}/cancel", timeout=10).ok
    status = slow_saves.wait_for(task_id, ("cancelled", "failed", "completed"), timeout=60)
    assert status["status"] == "cancelled"
    checkpoints = list_checkpoints(slow_saves.workspace / "models/cancelled")
    assert checkpoints
    for folder in checkpoints:
        assert_checkpoint_loads(folder)


def test_a_full_disk_fails_the_task_and_keeps_the_earlier_checkpoint(workspace: Path,
                                                                      server_env: dict[str, str]) -> None:
    full = workspace / "models" / "full"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(full)],
                             capture_output=True).returncode == 0
    extra = {} if mounted else {"GPT_SERVICE_TEST_ENOSPC_AFTER": "1"}
    server = start(workspace, server_env, **extra)
    try:
        body = LONG_RUN | {"output_dir": "models/full/run", "save_total_limit": 5}
        task_id = requests.post(f"{server.url}/train", json=body, timeout=30).json()["task_id"]
        status = server.wait_for(task_id, ("failed", "completed"))
        assert status["status"] == "failed" and "no space left" in status["error"].lower()
        checkpoints = list_checkpoints(full / "run")
        assert checkpoints and checkpoints[0].name == "checkpoint-5"
        for folder in checkpoints:
            assert_checkpoint_loads(folder)
        assert not (full / "run" / "lora_adapter").exists()
        assert requests.get(f"{server.url}/health", timeout=10).ok
    finally:
        server.stop()
        if mounted:
            subprocess.run(["umount", str(full)], check=False)


def test_two_submissions_of_one_output_dir_at_once_one_is_refused(server: Server) -> None:
    body = LONG_RUN | {"output_dir": "models/contested", "num_epochs": 1}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: requests.post(f"{server.url}/train", json=body, timeout=30), range(8)))
    assert sorted(a.status_code for a in answers) == [200] + [409] * 7
    assert len(requests.get(f"{server.url}/train/history", timeout=10).json()["tasks"]) == 1


def test_many_writers_lose_no_update_and_never_lock_out_a_reader(workspace: Path,
                                                                 server_env: dict[str, str]) -> None:
    server = start(workspace, server_env, GPT_SERVICE_MAX_CONCURRENT_TASKS="3")
    try:
        ids = [requests.post(f"{server.url}/train", json=LONG_RUN | {"output_dir": f"models/w{i}", "num_epochs": 3,
                                                                      "save_steps": 3}, timeout=30).json()["task_id"]
               for i in range(3)]
        failures: list[str] = []
        done = threading.Event()

        def read() -> None:
            while not done.is_set():
                for url in [f"{server.url}/train/history"] + [f"{server.url}/train/status/{i}" for i in ids]:
                    response = requests.get(url, timeout=30)
                    if response.status_code != 200:
                        failures.append(response.text)
                time.sleep(0.02)

        readers = [threading.Thread(target=read) for _ in range(3)]
        for reader in readers:
            reader.start()
        finals = [server.wait_for(task_id, ("completed", "failed"), timeout=180) for task_id in ids]
        done.set()
        for reader in readers:
            reader.join()
        assert failures == []
        for final in finals:
            assert final["status"] == "completed", final["error"]
            metrics = requests.get(f"{server.url}/train/{final['task_id']}/metrics", timeout=10).json()
            assert [p["step"] for p in metrics["loss"]] == list(range(1, final["total_steps"] + 1))
    finally:
        server.stop()


@pytest.mark.parametrize(("name", "content", "words"), [
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n', "malformed JSON at line 3"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "byte offset 28 (line 2)"),
    ("empty.jsonl", b"", "the dataset is empty"),
    ("huge.jsonl", b'{"text": "' + b"x" * (50 * 1024 * 1024) + b'"}\n', "line 1 has 52,428,812 characters"),
])
def test_bad_data_fails_the_task_with_the_place_named(server: Server, name: str, content: bytes,
                                                      words: str) -> None:
    (server.workspace / "data" / name).write_bytes(content)
    response = requests.post(f"{server.url}/train", json={"base_model": "models/tiny", "dataset_path": f"data/{name}"},
                             timeout=30)
    task_id = response.json()["task_id"]
    deadline = time.monotonic() + 120
    while (status := requests.get(f"{server.url}/train/status/{task_id}", timeout=10).json())["status"] in (
            "pending", "running"):
        assert requests.get(f"{server.url}/health", timeout=10).ok
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status["status"] == "failed" and words in status["error"], status["error"]


def test_a_failed_publish_leaves_the_old_adapter_whole(tmp_path: Path) -> None:
    target = tmp_path / "lora_adapter"
    publish_atomically(target, lambda folder: (folder / "adapter_model.safetensors").write_text("old"))

    def half_write(folder: Path) -> None:
        (folder / "adapter_model.safetensors").write_text("new, half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        publish_atomically(target, half_write)
    assert (target / "adapter_model.safetensors").read_text() == "old"
    assert not list(tmp_path.glob(".lora_adapter.tmp-*"))
