"""Limits: body size, prompt length, request fields, and a flood of 1000 concurrent requests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests

from tests.conftest import Server, free_port

pytestmark = pytest.mark.slow  # end-to-end: real servers, scripts and trainings


def rss_bytes(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS"))
    return int(line.split()[1]) * 1024


@pytest.fixture
def limited(workspace: Path, server_env: dict[str, str]) -> Iterator[Server]:
    env = server_env | {"GPT_SERVICE_MAX_WAITING_REQUESTS": "32", "GPT_SERVICE_MAX_BATCH_SIZE": "16",
                        "GPT_SERVICE_MAX_PROMPT_CHARS": "1000", "GPT_SERVICE_MAX_BODY_BYTES": "65536"}
    server = Server(workspace, free_port(), env).start()
    assert requests.post(f"{server.url}/models/load", json={"model_name": "m", "model_path": "models/tiny"},
                         timeout=120).ok
    yield server
    server.stop()


def test_oversized_bodies_get_413_announced_or_streamed(limited: Server) -> None:
    big = b'{"prompt": "' + b"a" * 100_000 + b'", "model_name": "m"}'
    announced = requests.post(f"{limited.url}/generate", data=big, headers={"content-type": "application/json"},
                              timeout=30)
    assert announced.status_code == 413 and "65536 bytes" in announced.json()["detail"]
    streamed = requests.post(f"{limited.url}/generate", data=iter([big[:40_000], big[40_000:]]),
                             headers={"content-type": "application/json"}, timeout=30)
    assert streamed.status_code == 413
    assert requests.get(f"{limited.url}/health", timeout=10).ok


@pytest.mark.parametrize(("path", "body", "code", "words"), [
    ("/generate", {"prompt": "a" * 1001}, 400, "at most 1000"),
    ("/generate", {"prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
    ("/generate", {"prompt": "x", "max_tokens": -1}, 422, "max_tokens"),
    ("/generate", {"prompt": "x", "max_tokens": 10**9}, 400, "at most 8192"),
    ("/generate", {"prompt": "x", "stop": ["a"] * 20}, 400, "at most 8"),
    ("/generate", {"prompt": "x", "stop": ["a" * 500]}, 400, "at most 200"),
    ("/v1/completions", {"prompt": "x", "n": 1000}, 422, "n"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "one string"),
])
def test_each_request_limit_answers_4xx(limited: Server, path: str, body: dict, code: int, words: str) -> None:
    name = {"model": "m"} if path.startswith("/v1") else {"model_name": "m"}
    response = requests.post(f"{limited.url}{path}", json=body | name, timeout=30)
    assert response.status_code == code, response.text
    payload = response.json()
    message = payload["error"]["message"] if path.startswith("/v1") else payload["detail"]
    assert words in message


def test_a_thousand_concurrent_requests_some_refused_the_rest_answered(limited: Server) -> None:
    assert limited.process is not None
    before = rss_bytes(limited.process.pid)

    async def flood() -> tuple[list[int], list[int]]:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=limited.url, timeout=300, limits=limits) as client:
            async def one(i: int) -> int:
                response = await client.post("/generate", json={"prompt": f"hello {i}", "model_name": "m",
                                                                 "max_tokens": 4})
                return response.status_code

            async def watch_health() -> list[int]:
                codes = []
                for _ in range(20):
                    codes.append((await client.get("/health")).status_code)
                    await asyncio.sleep(0.1)
                return codes

            results = await asyncio.gather(asyncio.gather(*(one(i) for i in range(1000))), watch_health())
            return results[0], results[1]

    codes, health = asyncio.run(flood())
    assert set(codes) <= {200, 429}, set(codes)
    assert codes.count(429) > 0 and codes.count(200) >= 32
    assert set(health) == {200}
    assert rss_bytes(limited.process.pid) - before < 300 * 1024 * 1024
    assert requests.post(f"{limited.url}/generate", json={"prompt": "x", "model_name": "m", "max_tokens": 2},
                         timeout=30).ok
