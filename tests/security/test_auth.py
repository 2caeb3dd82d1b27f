"""With an API key every route but /health needs it; without one the server stays on loopback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import Server, free_port

pytestmark = pytest.mark.slow  # end-to-end: real servers, scripts and trainings

KEY = "s3cret-key"


@pytest.fixture
def guarded(workspace: Path, server_env: dict[str, str]) -> Iterator[Server]:
    server = Server(workspace, free_port(), server_env | {"GPT_SERVICE_API_KEY": KEY}).start()
    yield server
    server.stop()


def test_every_route_but_health_needs_the_key(guarded: Server) -> None:
    spec = requests.get(f"{guarded.url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    routes = [(method, path.replace("{task_id}", "x").replace("{model_name}", "x"))
              for path, methods in spec["paths"].items() for method in methods]
    assert len(routes) >= 15
    for method, path in [*routes, ("get", "/docs"), ("get", "/openapi.json")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = requests.request(method, f"{guarded.url}{path}", headers=headers, json={}, timeout=10)
            if path == "/health":
                assert response.status_code == 200
            else:
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
    # and the document says so, with the body the 401 has
    documented = {(method, path) for path, methods in spec["paths"].items() for method, operation in methods.items()
                  if "401" in operation["responses"]}
    assert documented == {(m, p) for p, methods in spec["paths"].items() for m in methods} - {("get", "/health")}


def test_a_refused_call_does_nothing_and_the_right_key_works(guarded: Server) -> None:
    body = {"base_model": "models/tiny", "dataset_path": "data/train.json", "num_epochs": 1}
    assert requests.post(f"{guarded.url}/train", json=body, timeout=10).status_code == 401
    history = requests.get(f"{guarded.url}/train/history", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert history.json() == {"tasks": []}
    accepted = requests.post(f"{guarded.url}/train", json=body, headers={"Authorization": f"Bearer {KEY}"},
                             timeout=10)
    assert accepted.status_code == 200 and accepted.json()["status"] == "pending"


def test_openai_routes_answer_401_in_openai_shape(guarded: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=KEY).models.list().data == []


def test_without_a_key_the_server_will_not_listen_beyond_loopback(workspace: Path, server_env: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, "-m", "gpt_service.cli", "serve", "--workspace", str(workspace),
                             "--host", "0.0.0.0", "--port", str(free_port())],
                            env=server_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without an API key" in result.stderr


def test_cors_is_off_unless_configured(server: Server) -> None:
    response = requests.options(f"{server.url}/train/history", timeout=10, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in response.headers
    plain = requests.get(f"{server.url}/train/history", headers={"Origin": "https://evil.example"}, timeout=10)
    assert "access-control-allow-origin" not in plain.headers
