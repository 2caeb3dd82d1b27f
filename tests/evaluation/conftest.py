"""A workspace with the tiny model, an adapter trained on the eight question/answer pairs, and datasets;
and one server on it that evaluates more than 16 samples as a task."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import (
    QA_PAIRS,
    Server,
    free_port,
    make_workspace,
    qa_prompt,
    server_environment,
    write_json,
    write_jsonl,
)
from tests.service.test_serving_api import train_adapter

TASK_THRESHOLD = 16
QA_RECORDS = [{"prompt": qa_prompt(q), "completion": a} for q, a in QA_PAIRS]


@pytest.fixture(scope="session")
def eval_workspace(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    workspace = make_workspace(tmp_path_factory.mktemp("eval") / "ws", tiny_model)
    data = workspace / "data"
    write_jsonl(data / "qa.jsonl", QA_RECORDS)
    write_jsonl(data / "long.jsonl", QA_RECORDS * 4)
    write_jsonl(data / "long_bad.jsonl", [*QA_RECORDS * 4, {"question": "no known keys"}])
    write_json(data / "chat.json", [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                    for q, a in QA_PAIRS])
    (data / "plain.txt").write_text("".join(qa_prompt(q) + a + "\n" for q, a in QA_PAIRS), encoding="utf-8")
    (data / "broken.jsonl").write_text(json.dumps(QA_RECORDS[0], ensure_ascii=False) + "\n{not json\n",
                                       encoding="utf-8")
    return {"workspace": workspace, "adapter": train_adapter(workspace, "qa", data / "qa.jsonl")}


@pytest.fixture(scope="session")
def eval_server(eval_workspace: dict, hub_cache: Path) -> Iterator[Server]:
    env = server_environment(hub_cache, GPT_SERVICE_SERVE_DTYPE="float32",
                             GPT_SERVICE_EVALUATE_TASK_THRESHOLD=str(TASK_THRESHOLD))
    server = Server(eval_workspace["workspace"], free_port(), env).start()
    for name, adapter in [("base", None), ("tuned", eval_workspace["adapter"])]:
        response = requests.post(f"{server.url}/models/load", json={
            "model_name": name, "model_path": "models/tiny", "lora_adapter": adapter}, timeout=120)
        assert response.ok, response.text
    yield server
    server.stop()
