"""A real PostgreSQL server for tests: Debian's `postgresql` binaries, `initdb` + `pg_ctl` in a temp folder.

The server listens on a free port of 127.0.0.1 and keeps its unix socket in the same temp folder;
trust authentication, user `postgres`. PostgreSQL refuses to run as root, so under root the
binaries run as the `postgres` user (`runuser`), in a folder that user owns. Without the binaries
the tests that need the server are skipped, unless GPT_SERVICE_REQUIRE_POSTGRES=1 (set by
`.ci/run`), which turns the skip into a failure.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

REQUIRE_ENV = "GPT_SERVICE_REQUIRE_POSTGRES"


def postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL's bin folder holding initdb and pg_ctl, if installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


def missing_postgres() -> None:
    """Skip (or, in CI, fail) a test that needs PostgreSQL where it is not installed."""
    message = "PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb) are not installed"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message}, and {REQUIRE_ENV}=1 says they must be: apt-get install postgresql")
    pytest.skip(message)


class PostgresServer:
    def __init__(self, bin_dir: Path, port: int) -> None:
        self.bin_dir, self.port = bin_dir, port
        self.root = Path(tempfile.mkdtemp(prefix="gpt-service-pg-"))
        self.data, self.sockets = self.root / "data", self.root / "sockets"
        self.as_postgres = os.geteuid() == 0
        self.sockets.mkdir()
        if self.as_postgres:
            account = pwd.getpwnam("postgres")
            for path in (self.root, self.sockets):
                os.chown(path, account.pw_uid, account.pw_gid)

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_postgres else []
        result = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")

    def start(self) -> PostgresServer:
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--no-sync")
        options = f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300"
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
                  "-o", options, "-w", "-t", "60", "start")
        return self

    def stop(self) -> None:
        try:
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    @contextmanager
    def database(self) -> Iterator[str]:
        """A fresh, empty database for one test; dropped (its connections ended) afterwards."""
        name = f"test_{uuid.uuid4().hex[:12]}"
        admin = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        try:
            yield self.url(name)
        finally:
            with psycopg.connect(admin, autocommit=True) as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
