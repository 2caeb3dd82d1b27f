"""Real `gpt-service worker` and `gpt-service serve` processes on one task database, as on several machines.

Each process stands for a machine: its own name, its own log, signals sent to it alone. They share
one workspace, as machines share a filesystem for datasets and output folders.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from gpt_service.tasks.store import Attempt, TaskStore
from tests.conftest import Server, free_port

LEASE = ("--lease-seconds", "3", "--lease-renew-seconds", "0.5")  # short, so that tests wait little
TRAINING = {"base_model": "models/tiny", "dataset_path": "data/train.json", "batch_size": 4,
            "learning_rate": 1e-3, "save_steps": 10}


def wait_until(predicate: Callable[[], object], timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class WorkerProcess:
    """`gpt-service worker --name NAME` on the shared workspace and database."""

    def __init__(self, workspace: Path, url: str, name: str, env: dict[str, str], *flags: str) -> None:
        self.workspace, self.url, self.name, self.env, self.flags = workspace, url, name, env, flags
        self.log_path = workspace / f"worker-{name}.log"
        self.process: subprocess.Popen | None = None

    def start(self, store: TaskStore, wait: bool = True) -> WorkerProcess:
        """Start the process; with `wait`, return once it has registered (and so recovered its own tasks)."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gpt_service.cli", "worker", "--workspace", str(self.workspace),
             "--database-url", self.url, "--name", self.name, *LEASE, *self.flags],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        if wait:
            wait_until(lambda: self.registered(store), 60, f"worker {self.name} to register")
        return self

    def registered(self, store: TaskStore) -> bool:
        assert self.process is not None and self.process.poll() is None, self.log()
        return any(r.name == self.name and r.pid == self.process.pid for r in store.workers()[0])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.process is not None
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def start_workers(store: TaskStore, workers: list[WorkerProcess]) -> list[WorkerProcess]:
    """Start them all at once, then wait until each has registered."""
    for worker in workers:
        worker.start(store, wait=False)
    for worker in workers:
        wait_until(lambda worker=worker: worker.registered(store), 60, f"worker {worker.name} to register")
    return workers


def api_server(workspace: Path, url: str, env: dict[str, str], *flags: str) -> Server:
    """`gpt-service serve` on the shared database: `--no-worker`, or a built-in worker named by `flags`."""
    return Server(workspace, free_port(), env, ("--database-url", url, *LEASE, *flags)).start()


def attempts_by_task(store: TaskStore) -> dict[str, list[Attempt]]:
    found: dict[str, list[Attempt]] = {}
    for attempt in store.attempts():
        found.setdefault(attempt.task_id, []).append(attempt)
    return found


def assert_never_two_at_once(attempts: list[Attempt]) -> None:
    """Each claim of a task begins after the previous one ended, and every claim has ended."""
    ordered = sorted(attempts, key=lambda a: a.lease_token)
    assert [a.lease_token for a in ordered] == list(range(1, len(ordered) + 1))
    for earlier, later in itertools.pairwise(ordered):
        assert earlier.ended_at is not None and later.claimed_at >= earlier.ended_at, (earlier, later)
    assert ordered[-1].ended_at is not None
