"""One server shared by the tests of a module that change nothing a later test could see."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Server, free_port, make_workspace, server_environment


@pytest.fixture(scope="module")
def shared_server(tiny_model: Path, hub_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for a module whose tests change nothing a later test could see."""
    env = server_environment(hub_cache)
    srv = Server(make_workspace(tmp_path_factory.mktemp("sec") / "ws", tiny_model), free_port(), env).start()
    yield srv
    srv.stop()
