"""The worker: takes pending tasks in order and runs each in its own child process.

A thread in the server process. At most `max_concurrent_tasks` children run at once; a child that
dies without recording a verdict (killed, out of memory, crashed) gets its task marked failed
with the reason. A cancelled task that does not stop within the grace period is killed.

Each child leads a process group of its own, and is killed with it; the ranks of a training on
several processes (torchrun's children, each in a session of its own) die with the child.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gpt_service.settings import ServiceSettings
from gpt_service.tasks.store import TaskStore

log = logging.getLogger(__name__)
POLL_SECONDS = 0.25
RESTART_NOTE = "interrupted by a server restart"


@dataclass
class _Child:
    task_id: str
    process: subprocess.Popen
    cancel_seen_at: float | None = None
    killed_for_cancel: bool = False


def describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (the system may have run out of memory)" if -code == signal.SIGKILL else ""
        return f"the training process was killed by {name}{hint}"
    return f"the training process exited with code {code} without reporting a result"


def _is_runner_of(pid: int, task_id: str) -> bool:
    try:
        return task_id.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _kill(pid: int) -> None:
    """SIGKILL a child and its process group (it leads one: started with start_new_session)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:  # not a group leader (a runner of an older version): the process alone
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        _kill(process.pid)


class Worker:
    def __init__(self, settings: ServiceSettings, store: TaskStore) -> None:
        self.settings = settings
        self.store = store
        self.children: dict[str, _Child] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpt-service-worker", daemon=True)
        self.logs_dir = settings.workspace / "logs"

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self.recover_interrupted()
        self._thread.start()

    def stop(self) -> None:
        """Stop taking tasks and end running children; their tasks resume at the next start."""
        self._stop.set()
        self._thread.join(timeout=10)
        for child in self.children.values():
            _kill_group(child.process)
            child.process.wait(timeout=10)

    def recover_interrupted(self) -> None:
        """Tasks left `running` by a server that died: mark them failed, and re-queue when auto_resume."""
        for task in self.store.with_status("running"):
            if task.pid and _is_runner_of(task.pid, task.task_id):
                _kill(task.pid)  # an orphan from the previous server
            self.store.finish(task.task_id, "failed", error=RESTART_NOTE)
            self.store.append_log(task.task_id, RESTART_NOTE)
            if self.settings.auto_resume:
                self.store.requeue(task.task_id, "queued again to resume from its newest checkpoint")

    # -- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._reap()
                self._enforce_cancels()
                self._launch()
            except Exception:  # the worker must outlive any one bad task or database hiccup
                log.exception("worker iteration failed")
            self._stop.wait(POLL_SECONDS)

    def _launch(self) -> None:
        while len(self.children) < self.settings.max_concurrent_tasks and not self._stop.is_set():
            task = self.store.claim_next()
            if task is None:
                return
            if (previous := self.children.pop(task.task_id, None)) is not None:
                previous.process.wait()  # resumed while its last run was still exiting: let it go first
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.logs_dir / f"{task.task_id}.log"
            env = {**os.environ, "GPT_SERVICE_DATABASE_URL": str(self.settings.database_url),
                   "GPT_SERVICE_ALLOW_DOWNLOADS": "1" if self.settings.allow_downloads else "0"}
            with open(log_path, "ab") as output:
                process = subprocess.Popen(
                    [sys.executable, "-m", "gpt_service.tasks.runner", task.task_id],
                    cwd=self.settings.workspace, env=env, stdout=output, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )
            self.store.set_fields(task.task_id, pid=process.pid)
            self.children[task.task_id] = _Child(task.task_id, process)
            log.info("task %s started in process %d", task.task_id, process.pid)

    def _reap(self) -> None:
        for task_id, child in list(self.children.items()):
            code = child.process.poll()
            if code is None:
                continue
            del self.children[task_id]
            # Only this run's record: a child that recorded its own verdict keeps it, and a task
            # resumed meanwhile (a new pid, or none yet) belongs to its next run.
            if child.killed_for_cancel:
                self.store.finish(task_id, "cancelled", pid=child.process.pid)
            elif self.store.finish(task_id, "failed", error=describe_exit(code), pid=child.process.pid):
                self.store.append_log(task_id, describe_exit(code))

    def _enforce_cancels(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if child.cancel_seen_at is None:
                if self.store.cancel_requested(child.task_id):
                    child.cancel_seen_at = now
            elif now - child.cancel_seen_at > self.settings.cancel_grace_seconds and not child.killed_for_cancel:
                child.killed_for_cancel = True
                _kill_group(child.process)
