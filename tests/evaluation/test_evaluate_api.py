"""POST /evaluate against a real server: adapter against base, direct answers, long ones as tasks, refusals."""

from __future__ import annotations

import math
import time

import pytest
import requests

from tests.conftest import QA_PAIRS, Server
from tests.evaluation.conftest import TASK_THRESHOLD

pytestmark = pytest.mark.slow  # end-to-end: real servers, scripts and trainings


def evaluate(server: Server, **body: object) -> requests.Response:
    return requests.post(f"{server.url}/evaluate", json=body, timeout=300)


def test_the_adapter_beats_its_base_through_the_api(eval_server: Server, eval_workspace: dict) -> None:
    response = evaluate(eval_server, model_name="tuned", dataset_path="data/qa.jsonl", compare_to_base=True,
                        max_tokens=48, num_examples=8)
    assert response.status_code == 200, response.text
    result = response.json()
    tuned, base = result["metrics"], result["base_metrics"]
    assert result["samples"] == result["generated_samples"] == len(QA_PAIRS) and result["tokens"] > 0
    assert tuned["loss"] < base["loss"] and tuned["token_accuracy"] > base["token_accuracy"]
    assert tuned["exact_match"] == 1.0 > base["exact_match"] and tuned["chrf"] > base["chrf"]
    for figures in (tuned, base):
        assert figures["perplexity"] == pytest.approx(math.exp(figures["loss"]))
    assert result["difference"]["loss"] == pytest.approx(tuned["loss"] - base["loss"])
    assert result["time_seconds"] > 0 and result["model_name"] == "tuned"
    # The answers are the ones /generate gives for the same prompt.
    for sample in result["examples"][:2]:
        for model, key in (("tuned", "answer"), ("base", "base_answer")):
            generated = requests.post(f"{eval_server.url}/generate", json={
                "prompt": sample["prompt"], "model_name": model, "max_tokens": 48}, timeout=60).json()["text"]
            assert sample[key] == generated, model

    by_path = evaluate(eval_server, model_path="models/tiny", lora_adapter=eval_workspace["adapter"],
                       dtype="float32", dataset_path="data/qa.jsonl", generation=False)
    assert by_path.status_code == 200, by_path.text
    assert by_path.json()["metrics"]["loss"] == pytest.approx(tuned["loss"], rel=1e-4)
    assert by_path.json()["metrics"]["exact_match"] is None
    assert by_path.json()["model_name"] == "tuned"  # the loaded model served it: no second copy of the base
    in_bf16 = evaluate(eval_server, model_path="models/tiny", lora_adapter=eval_workspace["adapter"],
                       dtype="bfloat16", dataset_path="data/qa.jsonl", generation=False)
    assert in_bf16.status_code == 200, in_bf16.text
    assert in_bf16.json()["model_name"] == "tiny"  # not loaded in bf16: a copy of its own, for this call
    assert in_bf16.json()["metrics"]["loss"] == pytest.approx(tuned["loss"], rel=0.05)


def test_chat_records_are_answered_from_their_messages(eval_server: Server) -> None:
    result = evaluate(eval_server, model_name="base", dataset_path="data/chat.json", max_samples=2).json()
    assert result["samples"] == result["generated_samples"] == 2
    assert result["examples"][0]["prompt"].endswith("<|im_start|>assistant\n")
    assert result["examples"][0]["reference"] == QA_PAIRS[0][1] and result["base_metrics"] is None


def test_a_long_evaluation_runs_as_a_task_and_reports_progress(eval_server: Server) -> None:
    response = evaluate(eval_server, model_name="tuned", dataset_path="data/long.jsonl", max_tokens=48)
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "pending" and accepted["samples"] == 4 * len(QA_PAIRS) > TASK_THRESHOLD
    task_id = accepted["task_id"]
    seen, deadline = [], time.monotonic() + 180
    while time.monotonic() < deadline:
        status = requests.get(f"{eval_server.url}/train/status/{task_id}", timeout=10).json()
        seen.append((status["status"], status["progress"], status["current_step"]))
        assert requests.get(f"{eval_server.url}/health", timeout=5).ok  # the server answers meanwhile
        if status["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert status["status"] == "completed", status
    assert status["kind"] == "evaluate" and status["progress"] == 100.0
    assert status["current_step"] == status["total_steps"] == 4 + 32  # 4 loss batches, 32 answers
    assert [p for _, p, _ in seen] == sorted(p for _, p, _ in seen)
    result = status["result"]
    assert result["samples"] == 32 and result["metrics"]["exact_match"] == 1.0
    short = evaluate(eval_server, model_name="tuned", dataset_path="data/qa.jsonl", generation=False).json()
    assert result["metrics"]["loss"] == pytest.approx(short["metrics"]["loss"], rel=1e-4)
    history = requests.get(f"{eval_server.url}/train/history", timeout=10).json()["tasks"]
    assert any(t["task_id"] == task_id and t["kind"] == "evaluate" for t in history)
    bounded = evaluate(eval_server, model_name="tuned", dataset_path="data/long.jsonl", max_samples=TASK_THRESHOLD,
                       generation=False)
    assert bounded.status_code == 200 and bounded.json()["samples"] == TASK_THRESHOLD


@pytest.mark.parametrize(("body", "code", "words"), [
    ({"dataset_path": "data/missing.jsonl"}, 404, "does not exist"),
    ({"dataset_path": "data/broken.jsonl"}, 400, "malformed JSON at line 2"),
    ({"dataset_path": "data/qa.jsonl", "model_name": "nope"}, 404, "not loaded"),
    ({"dataset_path": "data/plain.txt", "generation": True}, 400, "no record has a reference"),
    ({"dataset_path": "data/long_bad.jsonl"}, 400, "record 33"),
    ({"dataset_path": "../outside.jsonl"}, 403, "outside"),
    ({"dataset_path": "data/qa.jsonl", "model_name": "base", "compare_to_base": True}, 400, "no lora_adapter"),
    ({"dataset_path": "data/qa.jsonl", "max_tokens": 10**6}, 400, "at most"),
    ({"dataset_path": "data/qa.jsonl", "model_path": "models/tiny"}, 422, "exactly one"),
    ({"dataset_path": "data/qa.jsonl", "model_name": None, "model_path": "models/nowhere"}, 404, "not a model folder"),
    ({"dataset_path": "data/qa.jsonl", "model_name": None, "model_path": "models/tiny",
      "lora_adapter": "models/tiny"}, 400, "adapter_config.json"),
    ({"dataset_path": "data/qa.jsonl", "max_samples": 0}, 422, "max_samples"),
])
def test_bad_input_is_a_clear_4xx(eval_server: Server, body: dict, code: int, words: str) -> None:
    response = evaluate(eval_server, **{"model_name": "tuned", **body})
    assert response.status_code == code, response.text
    assert words in response.json()["detail"]
