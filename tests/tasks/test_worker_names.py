"""Worker names: two unnamed workers on one host both start; a name given twice is refused, saying why."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gpt_service.tasks.store import TaskStore
from tests.tasks.cluster import wait_until


def worker(workspace: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gpt_service.cli", "worker", "--workspace", str(workspace), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_unnamed_workers_on_one_host_both_start_and_a_repeated_name_is_refused(tmp_path: Path) -> None:
    store = TaskStore(f"sqlite:///{tmp_path / 'gpt_service.db'}")
    first, second = worker(tmp_path), worker(tmp_path)
    try:
        wait_until(lambda: len(store.workers()[0]) == 2, 60, "two workers")
        host = socket.gethostname()
        names = {r.name for r in store.workers()[0]}
        assert host in names and names - {host} in ({f"{host}-{first.pid}"}, {f"{host}-{second.pid}"})
        named = worker(tmp_path, "--name", host)
        output, _ = named.communicate(timeout=60)
        assert named.returncode == 2 and f"a worker named {host!r} is alive" in output and "--name" in output
    finally:
        for process in (first, second):
            process.terminate()
            process.wait(timeout=30)
    assert store.workers()[0] == []  # each unregistered as it stopped
    store.close()


@pytest.mark.parametrize("command", ["worker", "serve"])
def test_a_renewal_not_shorter_than_the_lease_is_refused(tmp_path: Path, command: str) -> None:
    result = subprocess.run([sys.executable, "-m", "gpt_service.cli", command, "--workspace", str(tmp_path),
                             "--lease-seconds", "2", "--lease-renew-seconds", "5"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "lease_renew_seconds (5.0) must be shorter than lease_seconds" in result.stderr
