"""The `gpt-service` client against a real server with an API key: the real command line, its output
and its exit codes (0 ok, 1 refused or failed, 3 unreachable, 4 cancelled, 5 wrong key)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import requests

from tests.cli.conftest import KEY, clean_env, gpt_service
from tests.conftest import Server, free_port, qa_prompt

pytestmark = pytest.mark.slow  # end-to-end: real servers, scripts and trainings

TRAIN = ("train", "--base_model", "models/tiny", "--dataset_path", "data/train.json")
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def trained(keyed_server: Server) -> dict:
    """`gpt-service train --follow` to completion, the service named by GPT_SERVICE_URL."""
    done = gpt_service(*TRAIN, "--output_dir", "models/cli-run", "--num_epochs", "2", "--learning_rate", "5e-3",
                       "--follow", url=keyed_server.url)
    task_id = done.stdout.splitlines()[0] if done.stdout else ""
    return {"done": done, "task_id": task_id, "url": keyed_server.url}


def test_train_follow_shows_progress_and_exits_0_when_completed(trained: dict) -> None:
    done, task_id = trained["done"], trained["task_id"]
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"[0-9a-f]{32}", task_id)
    status = requests.get(f"{trained['url']}/train/status/{task_id}", headers=AUTH, timeout=10).json()
    steps = status["total_steps"]
    assert status["status"] == "completed" and steps > 0
    assert f"completed {steps} steps: final loss {status['loss']:.4f}" in done.stdout
    assert f"adapter saved to {status['adapter_path']}" in done.stdout
    for words in (f"task {task_id} running", f"task {task_id} completed", f"{steps}/{steps}", "loss ", "tok/s"):
        assert words in done.stderr


def test_status_history_and_logs_show_the_task(trained: dict) -> None:
    task_id, flags = trained["task_id"], ("--url", trained["url"], "--api-key", KEY)
    shown = gpt_service("status", task_id, *flags, key=None)
    assert shown.returncode == 0, shown.stderr
    assert "completed" in shown.stdout and "100.00%" in shown.stdout and "cli-run/lora_adapter" in shown.stdout
    assert json.loads(gpt_service("status", task_id, "--json", *flags).stdout)["status"] == "completed"

    table = gpt_service("history", *flags)
    assert table.returncode == 0 and task_id in table.stdout and "completed" in table.stdout
    listed = json.loads(gpt_service("history", "--status", "completed", "--json", *flags).stdout)
    assert task_id in [t["task_id"] for t in listed]
    assert json.loads(gpt_service("history", "--status", "failed", "--json", *flags).stdout) == []

    last = gpt_service("logs", task_id, "--tail", "1", *flags)
    assert last.returncode == 0 and len(last.stdout.splitlines()) == 1 and "completed" in last.stdout
    every = gpt_service("logs", task_id, "--all", *flags).stdout.splitlines()
    assert "training started" in every[0] and every[-1] == last.stdout.strip()


def test_load_models_generate_evaluate_unload(trained: dict) -> None:
    url, prompt = trained["url"], qa_prompt("你好")
    loaded = gpt_service("load", "tuned", "models/tiny", "--lora_adapter", "models/cli-run/lora_adapter", url=url)
    assert loaded.returncode == 0, loaded.stderr
    assert "loaded tuned" in loaded.stdout and "cli-run/lora_adapter" in loaded.stdout
    table = gpt_service("models", url=url)
    assert table.returncode == 0 and "tuned" in table.stdout and "1 model(s) loaded" in table.stdout
    assert [m["model_name"] for m in json.loads(gpt_service("models", "--json", url=url).stdout)] == ["tuned"]

    whole = json.loads(gpt_service("generate", "tuned", prompt, "--max_tokens", "24", "--json", url=url).stdout)
    streamed = gpt_service("generate", "tuned", prompt, "--max_tokens", "24", url=url)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == whole["text"] + "\n" and whole["usage"]["completion_tokens"] > 0
    assert gpt_service("generate", "tuned", "-", "--max_tokens", "24", stdin=prompt, url=url).stdout == streamed.stdout

    figures = gpt_service("evaluate", "--model_name", "tuned", "--dataset_path", "data/train.json", url=url)
    assert figures.returncode == 0, figures.stderr
    assert "loss" in figures.stdout and "perplexity" in figures.stdout and "tuned (adapter)" in figures.stdout

    assert gpt_service("unload", "tuned", url=url).stdout == "unloaded tuned\n"
    again = gpt_service("unload", "tuned", url=url)
    assert again.returncode == 1 and "'tuned' is not loaded" in again.stderr and "HTTP 404" in again.stderr
    assert "0 model(s) loaded" in gpt_service("models", url=url).stdout


def wait_for_step(server: Server, task_id: str, step: int) -> None:
    deadline = time.monotonic() + 90
    while (requests.get(f"{server.url}/train/status/{task_id}", headers=AUTH, timeout=10).json()
           ["current_step"] or 0) < step:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_cancel_ends_a_followed_task_with_4_and_resume_queues_a_cancelled_one(keyed_server: Server) -> None:
    url = keyed_server.url
    follower = subprocess.Popen(
        [sys.executable, "-m", "gpt_service.cli", *TRAIN, "--output_dir", "models/cli-long", "--num_epochs", "200",
         "--follow"], env=clean_env() | {"GPT_SERVICE_URL": url, "GPT_SERVICE_API_KEY": KEY},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert follower.stdout is not None
        running = follower.stdout.readline().strip()
        wait_for_step(keyed_server, running, 1)
        # A second task waits behind the running one: cancelled, resumed, cancelled again, all while pending.
        body = {"base_model": "models/tiny", "dataset_path": "data/train.json", "output_dir": "models/cli-queued"}
        queued = requests.post(f"{url}/train", json=body, headers=AUTH, timeout=10).json()["task_id"]
        assert gpt_service("cancel", queued, url=url).stdout == f"task {queued} cancelled\n"
        resumed = gpt_service("resume", queued, url=url)
        assert resumed.returncode == 0 and resumed.stdout == f"{queued}\n", resumed.stderr
        again = gpt_service("resume", queued, url=url)
        assert again.returncode == 1 and "only a failed or cancelled task can be resumed" in again.stderr
        assert gpt_service("cancel", queued, url=url).returncode == 0
        followed = gpt_service("status", queued, "--follow", url=url)
        assert followed.returncode == 4 and f"task {queued} cancelled" in followed.stderr
        assert "resume requested" in gpt_service("logs", queued, url=url).stdout

        cancelled = gpt_service("cancel", running, url=url)
        assert cancelled.returncode == 0 and f"task {running} cancelling" in cancelled.stdout
        _, errors = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 4, errors
    assert f"task {running} was cancelled" in errors and f"gpt-service resume {running}" in errors


def test_a_wrong_or_missing_key_exits_5(keyed_server: Server) -> None:
    for key in ("wrong", None):
        refused = gpt_service("history", url=keyed_server.url, key=key)
        assert refused.returncode == 5
        assert "wrong API key" in refused.stderr and "--api-key or set GPT_SERVICE_API_KEY" in refused.stderr


def test_a_server_that_is_down_exits_3() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for argv in (("status", "abc"), ("generate", "m", "hello"), ("models", "--url", url)):
        down = gpt_service(*argv, url=url)
        assert down.returncode == 3 and f"cannot reach the service at {url}" in down.stderr


def test_an_unknown_task_exits_1_with_the_services_message(keyed_server: Server) -> None:
    for command in ("status", "logs", "cancel", "resume"):
        unknown = gpt_service(command, "no-such-task", url=keyed_server.url)
        assert unknown.returncode == 1
        assert unknown.stderr == "error: no training task 'no-such-task'; GET /train/history lists the tasks " \
                                 "(HTTP 404)\n"
