"""/metrics in Prometheus format, /health, and JSON-lines logs, from a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server, free_port

pytestmark = pytest.mark.slow  # end-to-end: real servers, scripts and trainings


def samples(server: Server) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_health_and_json_logs(workspace: Path, server_env: dict[str, str]) -> None:
    server = Server(workspace, free_port(), server_env | {"GPT_SERVICE_LOG_FORMAT": "json"}).start()
    try:
        task_id = requests.post(f"{server.url}/train", json={"base_model": "models/tiny",
                                                             "dataset_path": "data/train.json", "num_epochs": 1},
                                timeout=30).json()["task_id"]
        assert server.wait_for(task_id, ("completed", "failed"))["status"] == "completed"
        assert requests.post(f"{server.url}/models/load", json={"model_name": "m", "model_path": "models/tiny"},
                             timeout=120).ok
        answer = requests.post(f"{server.url}/generate", json={"prompt": "hi", "model_name": "m", "max_tokens": 5},
                               timeout=60).json()
        requests.get(f"{server.url}/train/status/nope", timeout=10)
        shared = "You are a helpful assistant; answer briefly. " * 4  # two requests, one prompt prefix
        more = sum(requests.post(f"{server.url}/generate", json={"prompt": shared + question, "model_name": "m",
                                                                 "max_tokens": 1}, timeout=60).json()["usage"][
            "completion_tokens"] for question in ("hi", "bye"))

        found = samples(server)
        assert found[("gpt_service_http_requests_total", (("method", "POST"), ("route", "/train"),
                                                           ("status", "200")))] == 1
        assert found[("gpt_service_http_requests_total", (("method", "GET"), ("route", "/train/status/{task_id}"),
                                                           ("status", "404")))] == 1
        assert found[("gpt_service_tasks", (("status", "completed"),))] == 1
        assert found[("gpt_service_models_loaded", ())] == 1
        assert found[("gpt_service_queue_depth", (("model", "m"),))] == 0
        assert found[("gpt_service_generated_tokens_total", (("model", "m"),))] == answer["usage"][
            "completion_tokens"] + more
        assert found[("gpt_service_http_request_seconds_count", (("route", "/generate"),))] == 3
        engine = {name: value for (name, labels), value in found.items() if dict(labels).get("dtype")}
        assert engine["gpt_service_prefix_cache_hit_tokens_total"] >= 32  # the shared prefix's full blocks
        assert 0 < engine["gpt_service_prefix_cache_hit_rate"] < 1
        assert engine["gpt_service_kv_cache_blocks_free"] == engine["gpt_service_kv_cache_blocks"] > 0

        health = requests.get(f"{server.url}/health", timeout=10).json()
        assert health["worker_alive"] is True and health["engines_alive"] is True and health["models_loaded"] == 1
    finally:
        server.stop()
    lines = [line for line in (workspace / f"server-{server.port}.log").read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]
    assert any(e["logger"] == "uvicorn.access" and "/generate" in e["message"] for e in entries)
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)


def test_json_logs_take_other_libraries_warnings_too() -> None:
    """A library that logs through its own logger (`kernels`, loaded by bitsandbytes, warns when offline)
    writes a JSON line like ours, not logging's bare last-resort line."""
    code = ("import logging, logging.config; from gpt_service.logs import logging_config; "
            "logging.config.dictConfig(logging_config(True)); "
            "logging.getLogger('kernels._internals.hf_hub').warning('offline: trust not checked'); "
            "logging.getLogger('kernels._internals.hf_hub').info('below the level')")
    stderr = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    [line] = stderr.splitlines()
    entry = json.loads(line)
    assert (entry["level"], entry["logger"], entry["message"]) == ("WARNING", "kernels._internals.hf_hub",
                                                                   "offline: trust not checked")
