"""Bring a task database to the newest schema with Alembic, once, however many processes start at once.

A database made by release 0.1.0 has our tables but no `alembic_version`: it is stamped at
revision 0001 (its schema) and upgraded from there. Processes that start together take a lock
first, a PostgreSQL advisory lock or a file lock beside the SQLite file, so one upgrades and the
others find the work done.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.engine import Engine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
RELEASE_0_1_0 = "0001"  # the schema of databases made before migrations existed
ADVISORY_LOCK_KEY = 0x6770_7473  # "gpts": one key for every gpt-service process on a server


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


@contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    database = engine.url.database
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def upgrade_to_head(engine: Engine) -> None:
    """Upgrade the database in place; a no-op when it is already at the head.

    On SQLite the file lock is taken before the first connection, not only for the upgrade: a
    connection switches the file to WAL (`store._make_engine`), and two processes switching a
    rollback-journal file at once can deadlock, which SQLite answers at once with "database is
    locked" rather than waiting out the busy timeout (a database made by 0.1.0 is such a file).
    """
    head = head_revision()
    if engine.dialect.name == "sqlite":
        with _sqlite_file_lock(engine):
            _upgrade(engine, head)
        return
    with engine.connect() as connection:
        if current_revision(connection) == head:
            return
    _upgrade(engine, head)


def _upgrade(engine: Engine, head: str) -> None:
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":  # held to the end of this transaction
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
        revision = current_revision(connection)
        if revision == head:
            return
        config = alembic_config(connection)
        if revision is None and inspect(connection).has_table("tasks"):
            command.stamp(config, RELEASE_0_1_0)
        command.upgrade(config, "head")
