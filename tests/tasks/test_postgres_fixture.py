"""The PostgreSQL tests skip where the server is not installed, except in CI, where that is a failure."""

from __future__ import annotations

import pytest

from tests.postgres import REQUIRE_ENV, missing_postgres


def test_ci_turns_a_missing_postgresql_into_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="apt-get install postgresql"):
        missing_postgres()
    monkeypatch.delenv(REQUIRE_ENV)
    with pytest.raises(pytest.skip.Exception):
        missing_postgres()
