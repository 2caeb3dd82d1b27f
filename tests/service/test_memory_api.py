"""Will it fit? POST /train/estimate, `gpt-service train --estimate`, and a refusal before a run that cannot fit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests
from safetensors import safe_open

from tests.conftest import Server, free_port, server_environment

pytestmark = pytest.mark.slow  # real servers and trainings

BODY = {"base_model": "models/tiny", "dataset_path": "data/train.json", "num_epochs": 2, "batch_size": 4}


def parameter_bytes(model_dir: Path) -> int:
    with safe_open(model_dir / "model.safetensors", "pt") as weights:
        tensors = [weights.get_tensor(key) for key in weights.keys()]  # noqa: SIM118 - safe_open has no iterator
    return sum(t.numel() * t.element_size() for t in tensors)


def test_the_estimate_answers_and_the_run_takes_the_steps_it_said(workspace: Path, hub_cache: Path) -> None:
    server = Server(workspace, free_port(), server_environment(hub_cache)).start()
    try:
        answer = requests.post(f"{server.url}/train/estimate", json={**BODY, "bf16": False}, timeout=120)
        assert answer.status_code == 200, answer.text
        estimate = answer.json()
        weights = parameter_bytes(workspace / "models" / "tiny")  # fp32 weights, each tensor once
        assert estimate["weights_gb"] == pytest.approx(weights / 2**30, rel=1e-3)
        assert estimate["fits"] is True and estimate["gradient_checkpointing"] is False  # plenty of room here
        assert 0 < estimate["activations_with_checkpointing_gb"] <= estimate["activations_without_checkpointing_gb"]
        assert estimate["needed_gb"] <= estimate["available_gb"] and estimate["eta_seconds"] > 0

        four_bit = requests.post(f"{server.url}/train/estimate", timeout=120,
                                 json={**BODY, "bf16": False, "quantization": {"bits": 4}}).json()
        assert four_bit["quantization"] == "4-bit nf4" and four_bit["weights_gb"] < estimate["weights_gb"]

        task = requests.post(f"{server.url}/train", json={**BODY, "bf16": False}, timeout=120).json()
        done = server.wait_for(task["task_id"], ("completed", "failed"))
        assert done["status"] == "completed", done["error"]
        assert done["total_steps"] == estimate["total_steps"]

        bad = requests.post(f"{server.url}/train/estimate", json={**BODY, "dataset_path": "data/none.json"},
                            timeout=30)
        assert bad.status_code == 404 and "data/none.json" in bad.json()["detail"]
    finally:
        server.stop()


def test_a_run_no_worker_has_the_memory_for_is_refused_at_once(workspace: Path, hub_cache: Path) -> None:
    env = server_environment(hub_cache, GPT_SERVICE_WORKER_MEMORY_GB="0.25")  # the built-in worker offers 0.25 GB
    server = Server(workspace, free_port(), env).start()
    try:
        answer = requests.post(f"{server.url}/train", json=BODY, timeout=120)
        assert answer.status_code == 400
        message = answer.json()["detail"]
        assert "needs at least" in message and "has 0.2 GB" in message and "gradient_checkpointing" in message
        assert requests.get(f"{server.url}/train/history", timeout=10).json()["tasks"] == []  # nothing queued
    finally:
        server.stop()


def test_the_cli_estimates_here(workspace: Path, hub_cache: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gpt_service.cli", "train", "--base_model", "models/tiny",
         "--dataset_path", "data/train.json", "--estimate", "--gradient_checkpointing", "true"],
        cwd=workspace, env=server_environment(hub_cache), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "with gradient_checkpointing on" in out.stdout and "fits" in out.stdout
    assert not (workspace / "models" / "checkpoints").exists()  # nothing was trained
