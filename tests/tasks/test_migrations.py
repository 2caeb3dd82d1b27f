"""Schema migrations: a database made by release 0.1.0 upgrades in place, on SQLite and PostgreSQL, however
many processes start on it at once.

`data/gpt_service-0.1.0.db` was written by 0.1.0's own `TaskStore` (before migrations existed): a
completed task with metrics and logs, a task left running by a server that died, a pending one.
"""

from __future__ import annotations

import fcntl
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from gpt_service.tasks.migrate import alembic_config, current_revision, head_revision
from gpt_service.tasks.store import TaskStore

LEGACY_DB = Path(__file__).parent / "data" / "gpt_service-0.1.0.db"
DONE, RUNNING, PENDING = "a" * 32, "b" * 32, "c" * 32


def revision_of(url: str) -> str | None:
    engine = create_engine(url)
    with engine.connect() as connection:
        revision = current_revision(connection)
    engine.dispose()
    return revision


def test_a_sqlite_file_of_release_0_1_0_upgrades_in_place(tmp_path: Path) -> None:
    path = shutil.copy(LEGACY_DB, tmp_path / "gpt_service.db")
    url = f"sqlite:///{path}"
    assert revision_of(url) is None
    store = TaskStore(url)
    assert revision_of(url) == head_revision() == "0002"
    done = store.get(DONE)
    assert done is not None and (done.status, done.progress, done.adapter_path) == (
        "completed", 100.0, "/ws/models/done/lora_adapter")
    assert (done.lease_token, done.reclaims, done.need_processes, done.need_device) == (0, 0, 1, None)
    assert store.metrics(DONE)[0]["loss"] == 2.0 and store.log_lines(DONE, None) == ["training started", "completed"]
    assert [t.task_id for t in store.list()] == [PENDING, RUNNING, DONE]
    # The task 0.1.0's server left running holds no lease: the first reclaim sends it back to resume.
    assert store.reclaim_expired(max_reclaims=3) == [(RUNNING, "pending")]
    assert store.get(RUNNING).resume  # type: ignore[union-attr]
    store.close()


def test_a_postgresql_database_of_release_0_1_0_upgrades_in_place(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0001")  # 0.1.0's schema, then one of its rows
        connection.execute(text(
            "INSERT INTO tasks (task_id, kind, status, request, progress, step, cancel_requested, resume, attempts, "
            "created_at, updated_at) VALUES (:id, 'train', 'completed', '{\"base_model\": \"m\"}', 100, 8, false, "
            "false, 1, now(), now())"), {"id": DONE})
    engine.dispose()
    store = TaskStore(postgres_url)
    assert revision_of(postgres_url) == "0002"
    done = store.get(DONE)
    assert done is not None and done.status == "completed" and done.request == {"base_model": "m"}
    assert (done.lease_token, done.need_processes) == (0, 1)
    store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_processes_starting_together_upgrade_once(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{shutil.copy(LEGACY_DB, tmp_path / 'gpt_service.db')}"
    else:
        url = request.getfixturevalue("postgres_url")
    code = "import sys; from gpt_service.tasks.store import TaskStore; TaskStore(sys.argv[1]).close()"
    starters = [subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE, text=True)
                for _ in range(4)]
    errors = [starter.communicate(timeout=120)[1] for starter in starters]
    assert [starter.returncode for starter in starters] == [0] * 4, errors
    assert revision_of(url) == "0002"


def test_a_sqlite_store_opens_its_database_only_under_the_start_lock(tmp_path: Path) -> None:
    """Its first connection switches the file to WAL: while another process starts (holds the lock), it
    waits before connecting, so two processes never switch a rollback-journal file at once (a deadlock
    SQLite answers with "database is locked" at once)."""
    database = shutil.copy(LEGACY_DB, tmp_path / "gpt_service.db")
    code = "import sys; from gpt_service.tasks.store import TaskStore; TaskStore(sys.argv[1]).close()"
    with open(f"{database}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        starter = subprocess.Popen([sys.executable, "-c", code, f"sqlite:///{database}"], stderr=subprocess.PIPE,
                                   text=True)
        deadline = time.monotonic() + 120
        while f" -> FLOCK  ADVISORY  WRITE {starter.pid} " not in Path("/proc/locks").read_text():
            assert starter.poll() is None and time.monotonic() < deadline, "the store did not wait for the lock"
            time.sleep(0.05)
        assert journal_mode(database) == "delete"  # not opened by the waiting store
        fcntl.flock(lock, fcntl.LOCK_UN)
    assert starter.communicate(timeout=120)[1] == "" and starter.returncode == 0
    assert journal_mode(database) == "wal" and revision_of(f"sqlite:///{database}") == head_revision()


def journal_mode(database: Path) -> str:
    connection = sqlite3.connect(database)
    try:
        return connection.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        connection.close()
