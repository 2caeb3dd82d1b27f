"""The service fixtures (a real server on its own workspace), shared with tests/service."""

from tests.service.conftest import hub_cache, server, server_env, workspace  # noqa: F401
