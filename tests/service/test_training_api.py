"""The training API against a real server process: the spec's snippets, cancel, restart, queueing, refusals."""

from __future__ import annotations

import contextlib
import io
import os
import re
import time
from pathlib import Path

import pytest
import requests
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import REPO, Server, free_port, on_port

pytestmark = pytest.mark.slow  # end-to-end: real servers, scripts and trainings

GUIDE = REPO / "docs" / "training_guide.zh.md"


def guide_block(marker: str) -> str:
    """The guide's Python block that contains `marker`, as the guide has it."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.DOTALL)
    return next(block for block in blocks if marker in block)


# The guide's client code ("使用API", "查询训练状态", "查看训练历史"), read from the guide itself; the status
# block's placeholder id gives way to the id the first block printed.
SPEC_SUBMIT = guide_block('"http://localhost:8000/train",')
SPEC_POLL = guide_block("while True:").replace('task_id = "your-task-id"\n', "")
SPEC_HISTORY = guide_block("/train/history")


def run_snippet(code: str, namespace: dict, port: int) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(on_port(code, port), namespace)
    return out.getvalue()


def submit(server: Server, **body) -> requests.Response:
    payload = {"base_model": "models/tiny", "dataset_path": "data/train.json", **body}
    return requests.post(f"{server.url}/train", json=payload, timeout=30)


def test_the_guides_client_code_runs_unchanged(workspace: Path, server_env: dict[str, str]) -> None:
    server = Server(workspace, free_port(), server_env).start()
    try:
        namespace: dict = {}
        printed = run_snippet(SPEC_SUBMIT, namespace, server.port)
        task_id = namespace["task_id"]
        assert printed == f"训练任务ID: {task_id}\n"
        printed = run_snippet(SPEC_POLL, namespace, server.port)
        assert printed.splitlines()[-1] == "状态: completed, 进度: 100.00%"
        printed = run_snippet(SPEC_HISTORY, namespace, server.port)
        assert f"{task_id}: completed - 100.00%" in printed
    finally:
        server.stop()
    adapter = workspace / "models/checkpoints/my_task/lora_adapter"
    status = namespace["status"]
    assert status["adapter_path"] == str(adapter)
    assert status["current_step"] == status["total_steps"] > 0 and status["loss"] is not None
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace / "models/tiny"), adapter)
    assert model.peft_config["default"].r == 16


def test_status_reports_progress_metrics_and_logs(server: Server) -> None:
    task_id = submit(server, num_epochs=4, eval_steps=5, save_steps=10, output_dir="models/run-a").json()["task_id"]
    status = server.wait_for(task_id, ("completed", "failed"))
    assert status["status"] == "completed", status["error"]
    for key in ("progress", "current_step", "total_steps", "epoch", "loss", "eval_loss", "learning_rate",
                "tokens_per_second", "eta_seconds", "created_at", "started_at", "finished_at", "adapter_path"):
        assert status[key] is not None, key
    metrics = requests.get(f"{server.url}/train/{task_id}/metrics", timeout=10).json()
    assert [p["step"] for p in metrics["loss"]] == list(range(1, status["total_steps"] + 1))
    assert [p["step"] for p in metrics["eval_loss"]][:2] == [5, 10]
    logs = requests.get(f"{server.url}/train/{task_id}/logs", timeout=10).json()["lines"]
    assert any("checkpoint saved" in line for line in logs) and "completed" in logs[-1]

    history = requests.get(f"{server.url}/train/history", params={"status": "completed"}, timeout=10).json()
    assert [t["task_id"] for t in history["tasks"]] == [task_id]
    assert requests.get(f"{server.url}/train/history", params={"status": "running"}, timeout=10).json() == {
        "tasks": []}

    deleted = requests.delete(f"{server.url}/train/{task_id}", params={"delete_files": True}, timeout=10)
    assert deleted.ok and not Path(status["output_dir"]).exists()
    assert requests.get(f"{server.url}/train/status/{task_id}", timeout=10).status_code == 404


def test_cancel_a_running_task_keeps_its_checkpoint(server: Server) -> None:
    task_id = submit(server, num_epochs=500, save_steps=20, output_dir="models/long").json()["task_id"]
    server.wait_for_step(task_id, 25)
    asked = time.monotonic()
    assert requests.post(f"{server.url}/train/{task_id}/cancel", timeout=10).ok
    status = server.wait_for(task_id, ("cancelled", "failed", "completed"), timeout=30)
    assert status["status"] == "cancelled"
    assert time.monotonic() - asked < 10
    assert list((server.workspace / "models/long").glob("checkpoint-*"))
    assert requests.post(f"{server.url}/train/{task_id}/cancel", timeout=10).json()["status"] == "cancelled"


def test_pending_task_is_cancelled_at_once_and_queue_runs_one_at_a_time(server: Server) -> None:
    first = submit(server, num_epochs=6, output_dir="models/q1").json()["task_id"]
    second = submit(server, num_epochs=2, output_dir="models/q2").json()["task_id"]
    third = submit(server, num_epochs=2, output_dir="models/q3").json()["task_id"]
    cancelled = requests.post(f"{server.url}/train/{third}/cancel", timeout=10).json()
    assert cancelled["status"] == "cancelled"
    done_first = server.wait_for(first, ("completed", "failed"))
    done_second = server.wait_for(second, ("completed", "failed"))
    assert done_first["status"] == done_second["status"] == "completed"
    assert done_second["started_at"] >= done_first["finished_at"]
    history = requests.get(f"{server.url}/train/history", timeout=10).json()["tasks"]
    assert [t["task_id"] for t in history] == [third, second, first]
    assert requests.get(f"{server.url}/train/history", params={"limit": 1, "offset": 1},
                        timeout=10).json()["tasks"][0]["task_id"] == second


def test_kill_9_of_the_server_then_restart_resumes_to_the_uninterrupted_adapter(
    workspace: Path, server_env: dict[str, str]
) -> None:
    body = {"num_epochs": 15, "save_steps": 25, "batch_size": 4, "learning_rate": 1e-3}
    server = Server(workspace, free_port(), server_env).start()
    task_id = submit(server, output_dir="models/interrupted", **body).json()["task_id"]
    deadline = time.monotonic() + 60
    while not list((workspace / "models/interrupted").glob("checkpoint-*")):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    server.kill()
    time.sleep(1)

    restarted = Server(workspace, free_port(), server_env).start()
    try:
        status = restarted.wait_for(task_id, ("completed",), timeout=120)
        logs = requests.get(f"{restarted.url}/train/{task_id}/logs", params={"all": True}, timeout=10).json()
        assert any("interrupted by a server restart" in line for line in logs["lines"])
        assert status["attempts"] == 2
        straight_id = submit(restarted, output_dir="models/straight", **body).json()["task_id"]
        assert restarted.wait_for(straight_id, ("completed", "failed"))["status"] == "completed"
    finally:
        restarted.stop()
    expected = load_file(workspace / "models/straight/lora_adapter/adapter_model.safetensors")
    actual = load_file(workspace / "models/interrupted/lora_adapter/adapter_model.safetensors")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("body", "code", "words"), [
    ({"dataset_path": "data/missing.json"}, 404, "does not exist"),
    ({"dataset_path": "../outside.json"}, 403, "outside data/"),
    ({"dataset_path": "/etc/passwd"}, 403, "outside data/"),
    ({"dataset_path": "data"}, 400, "not a regular file"),
    ({"dataset_path": "data/train.csv"}, 400, "dataset_format"),
    ({"base_model": "Qwen/NotCached-1B"}, 400, "GPT_SERVICE_ALLOW_DOWNLOADS"),
    ({"base_model": "models/nothing-here"}, 404, "not a model folder"),
    ({"base_model": "/tmp"}, 403, "outside models/"),
    ({"output_dir": "/tmp/elsewhere"}, 403, "outside models/"),
    ({"output_dir": "models/tiny"}, 409, "already holds"),
    ({"num_epochs": "three"}, 422, "num_epochs"),
    ({"num_epochs": 0}, 422, "num_epochs"),
    ({"learning_rate": -1}, 422, "learning_rate"),
    ({"lora_config": {"r": 0}}, 422, "lora_config.r"),
    ({"lora_config": {"rank": 8}}, 422, "lora_config.rank"),
    ({"dataset_format": "csv"}, 422, "dataset_format"),
    ({"epochs": 3}, 422, "epochs"),
])
def test_bad_submissions_are_refused_at_once(server: Server, body: dict, code: int, words: str) -> None:
    (server.workspace / "data" / "train.csv").write_text("text\nhello\n")
    response = submit(server, **body)
    assert response.status_code == code, response.text
    assert words in response.json()["detail"]
    assert requests.get(f"{server.url}/train/history", timeout=10).json() == {"tasks": []}


def test_a_busy_output_dir_is_refused_with_409(server: Server) -> None:
    first = submit(server, num_epochs=200, output_dir="models/shared")
    assert first.ok
    second = submit(server, num_epochs=1, output_dir="models/shared")
    assert second.status_code == 409 and "in use by task" in second.json()["detail"]
    requests.post(f"{server.url}/train/{first.json()['task_id']}/cancel", timeout=10)


def test_unknown_task_ids_get_404_with_a_json_body(server: Server) -> None:
    for method, path in [("get", "/train/status/nope"), ("post", "/train/nope/cancel"),
                         ("post", "/train/nope/resume"), ("get", "/train/nope/logs"), ("delete", "/train/nope")]:
        response = requests.request(method, f"{server.url}{path}", timeout=10)
        assert response.status_code == 404
        assert "no training task 'nope'" in response.json()["detail"]


def test_the_http_layer_does_not_import_torch() -> None:
    code = "import sys, gpt_service.api; from gpt_service.api import create_app; create_app(); " \
           "print('torch' in sys.modules)"
    result = os.popen(f'"{os.sys.executable}" -c "{code}"').read().strip()
    assert result == "False"


def test_resume_right_after_a_cancel_runs_to_completion(server: Server) -> None:
    task_id = submit(server, num_epochs=30, save_steps=10, output_dir="models/again").json()["task_id"]
    server.wait_for_step(task_id, 12)
    requests.post(f"{server.url}/train/{task_id}/cancel", timeout=10)
    server.wait_for(task_id, ("cancelled",), timeout=30)
    resumed = requests.post(f"{server.url}/train/{task_id}/resume", timeout=10)
    assert resumed.ok and resumed.json()["status"] == "pending"
    final = server.wait_for(task_id, ("completed", "failed"), timeout=120)
    assert final["status"] == "completed", final["error"]
    assert final["attempts"] == 2
