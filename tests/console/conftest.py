"""The service fixtures (a real server on its own workspace), shared with tests/service."""

from __future__ import annotations

from tests.service.conftest import Server, free_port, hub_cache, make_workspace, server, server_env, workspace  # noqa: F401
