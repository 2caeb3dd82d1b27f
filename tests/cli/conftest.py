"""One server with an API key for the client's tests, and `gpt_service()`, the real command line in a
subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Server, free_port, make_workspace, server_environment

KEY = "cli-test-key"


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("GPT_SERVICE_")}


def gpt_service(*argv: str, url: str | None = None, key: str | None = KEY, stdin: str | None = None,
                timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """`gpt-service ARGV` with the service named by GPT_SERVICE_URL and GPT_SERVICE_API_KEY (when given)."""
    env = clean_env() | {"PYTHONIOENCODING": "utf-8"}
    env |= {"GPT_SERVICE_URL": url} if url else {}
    env |= {"GPT_SERVICE_API_KEY": key} if key else {}
    return subprocess.run([sys.executable, "-m", "gpt_service.cli", *argv], env=env, input=stdin,
                          capture_output=True, text=True, encoding="utf-8", timeout=timeout)


@pytest.fixture(scope="module")
def keyed_server(tiny_model: Path, hub_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with an API key for a module's tests; they run one after another on it."""
    env = server_environment(hub_cache, GPT_SERVICE_SERVE_DTYPE="float32")
    root = make_workspace(tmp_path_factory.mktemp("cli") / "ws", tiny_model)
    srv = Server(root, free_port(), env, ("--api-key", KEY)).start()
    yield srv
    srv.stop()
