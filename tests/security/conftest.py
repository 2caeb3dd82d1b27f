"""The service fixtures (a real server on its own workspace), shared with tests/service."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.conftest import Server, free_port, hub_cache, make_workspace, server, server_env, workspace  # noqa: F401


@pytest.fixture(scope="module")
def shared_server(tiny_model: Path, hub_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:  # noqa: F811
    """One server for a module whose tests change nothing a later test could see."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPT_SERVICE_")}
    env |= {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    srv = Server(make_workspace(tmp_path_factory.mktemp("sec") / "ws", tiny_model), free_port(), env).start()
    yield srv
    srv.stop()
