"""The OpenAPI document tells the truth: schemathesis, an independent API tester, checks a live server against it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.conftest import Server

pytestmark = pytest.mark.slow  # end-to-end: real servers, scripts and trainings

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
UNLOAD_ROUTES = r"^/models/(unload|\{model_name\})$"
CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance"


def test_document_shapes(server: Server) -> None:
    document = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    answers = document["paths"]["/train/status/{task_id}"]["get"]["responses"]
    assert answers["404"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    completion = document["paths"]["/v1/completions"]["post"]["responses"]
    assert completion["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIErrorBody")
    assert "text/event-stream" in completion["200"]["content"]
    assert list(document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert "HTTPValidationError" not in document["components"]["schemas"]
    # what a 422 really looks like is what the document says
    body = requests.post(f"{server.url}/train", json={}, timeout=10).json()
    assert isinstance(body["detail"], str) and body["errors"][0]["loc"] == ["body", "base_model"]


def test_schemathesis_finds_nothing(server: Server, tmp_path: Path) -> None:
    """Every operation, a bounded number of generated requests each, with a model loaded under the
    documents' example name so the generation routes answer 200 (plain and streamed) as well as errors."""
    loaded = requests.post(f"{server.url}/models/load", timeout=120,
                           json={"model_name": "my-fine-tuned-model", "model_path": "models/tiny"})
    assert loaded.status_code == 200, loaded.text
    # the unload routes go last, so the model stays loaded while every other operation runs
    for which in ("--exclude-path-regex", "--include-path-regex"):
        run = subprocess.run(
            [str(SCHEMATHESIS), "run", f"{server.url}/openapi.json", "--checks", CHECKS, "--max-examples", "25",
             "--seed", "20261202", "--workers", "1", "--no-color", "--request-timeout", "60",
             which, UNLOAD_ROUTES],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,  # its cache stays out of the checkout
        )
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert "Tested: " in run.stdout, run.stdout[-2000:]
    for route in ("/generate", "/v1/completions", "/v1/chat/completions"):
        answered = server.metric("gpt_service_http_requests", route=route, method="POST", status="200")
        assert answered > 0, f"no generated {route} request reached the model"
