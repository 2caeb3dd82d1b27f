"""`POST /train` with `num_processes: 2` through a real server: torchrun ranks under the worker."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import requests

from gpt_service.training import allocator
from tests.conftest import Server, rank_pid

BODY = {"base_model": "models/tiny", "dataset_path": "data/train.json", "batch_size": 2, "num_processes": 2,
        "validation_split": 0.25, "lora_config": {"lora_dropout": 0}}


def processes_of(task_id: str) -> list[int]:
    """Every live process whose command line names the task: its launcher and its ranks."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if task_id.encode() in cmdline and "zombie" not in state:
            found.append(int(proc.name))
    return found


def logs(server: Server, task_id: str) -> str:
    answer = requests.get(f"{server.url}/train/{task_id}/logs", params={"all": "true"}, timeout=10).json()
    return "\n".join(answer["lines"])


@pytest.mark.slow
def test_a_two_process_training_completes_and_a_cancelled_one_stops_every_rank(server: Server) -> None:
    task_id = requests.post(f"{server.url}/train", json=BODY | {"num_epochs": 2}, timeout=30).json()["task_id"]
    status = server.wait_for(task_id, ("completed", "failed", "cancelled"), timeout=240)
    assert status["status"] == "completed", f"{status['error']}\n{logs(server, task_id)}"
    assert status["progress"] == 100.0 and status["tokens_per_second"] > 0
    assert (Path(status["adapter_path"]) / "adapter_model.safetensors").is_file()
    text = logs(server, task_id)
    assert "launching 2 training processes under torchrun (ddp" in text
    assert "global batch 4 = batch_size 2 x gradient_accumulation_steps 1 x 2 process(es); ddp over 2" in text
    assert f"memory allocator {'tcmalloc' if allocator.wanted_library({}) else 'glibc'}" in text
    metrics = requests.get(f"{server.url}/train/{task_id}/metrics", timeout=10).json()
    steps = [p["step"] for p in metrics["loss"]]
    assert steps == list(range(1, status["total_steps"] + 1))

    long_id = requests.post(f"{server.url}/train", json=BODY | {"num_epochs": 500, "output_dir": "models/long"},
                            timeout=30).json()["task_id"]
    server.wait_for_step(long_id, 2, timeout=180)
    assert len(processes_of(long_id)) == 3  # the launcher and two ranks
    requests.post(f"{server.url}/train/{long_id}/cancel", timeout=10).raise_for_status()
    assert server.wait_for(long_id, ("cancelled", "failed", "completed"), timeout=120)["status"] == "cancelled"
    none_left(long_id)


def none_left(task_id: str) -> None:
    deadline = time.monotonic() + 60
    while processes_of(task_id):
        assert time.monotonic() < deadline, f"processes left behind: {processes_of(task_id)}"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_rank_that_dies_fails_the_task_naming_it(server: Server) -> None:
    task_id = requests.post(f"{server.url}/train", json=BODY | {"num_epochs": 500}, timeout=30).json()["task_id"]
    server.wait_for_step(task_id, 2, timeout=180)
    victim = rank_pid(task_id, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    status = server.wait_for(task_id, ("failed", "cancelled", "completed"), timeout=120)
    assert status["status"] == "failed"
    # rank 0 may be stopped by torchrun or fail on the closed connection first: either way rank 1 is named
    error = status["error"]
    assert error.startswith("a training process failed: ") and "rank 1 was killed by SIGKILL" in error
    none_left(task_id)
