"""The worker: claims tasks it can run from the shared queue and runs each in its own child process.

A thread, in `gpt-service serve` (the built-in worker) or in `gpt-service worker` (no HTTP). Any
number of workers may share one database. Each claim carries a lease (tasks/leases.py) that this
thread, never the training child, renews every `lease_renew_seconds`; a renewal refused means the
lease was lost (this process stalled past it, or the database was out of reach), and the child is
killed at once: the task already belongs to another run. The same tick sends expired leases of any
worker back to the queue and beats this worker's heartbeat.

At most `max_concurrent_tasks` children run at once; a child that dies without recording a verdict
(killed, out of memory, crashed) gets its task marked failed with the reason. A cancelled task that
does not stop within the grace period is killed. Starting, a worker touches only the tasks it held
itself under its name (left by its previous run); stopping, it gives its tasks back to the queue.

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
from dataclasses import dataclass, replace

from gpt_service.settings import ServiceSettings
from gpt_service.tasks.leases import LEASE_LOST_EXIT, Lease, WorkerNameInUse
from gpt_service.tasks.placement import make_offer, unseen_paths
from gpt_service.tasks.store import Task, TaskStore
from gpt_service.training import allocator

log = logging.getLogger(__name__)
POLL_SECONDS = 0.25
RESTART_NOTE = "interrupted by a server restart"


@dataclass
class _Child:
    lease: Lease
    process: subprocess.Popen
    cancel_seen_at: float | None = None
    killed_for_cancel: bool = False
    lease_lost: bool = False


def describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (the system may have run out of memory)" if -code == signal.SIGKILL else ""
        return f"the training process was killed by {name}{hint}"
    return f"the training process exited with code {code} without reporting a result"


def lease_margin(settings: ServiceSettings) -> float:
    """A run stops writing this long before its lease would end unrenewed: a quarter of the lease."""
    return settings.lease_seconds / 4


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a child and its process group (it leads one: started with start_new_session)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:  # gone meanwhile, or not a group leader: the process alone
        with contextlib.suppress(ProcessLookupError):
            process.kill()


class Worker:
    def __init__(self, settings: ServiceSettings, store: TaskStore) -> None:
        self.settings = settings
        self.store = store
        self.offer = make_offer(settings.worker_name, settings.max_concurrent_tasks, settings.worker_device,
                                settings.worker_device_count, settings.worker_memory_gb)
        self.children: dict[str, _Child] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpt-service-worker", daemon=True)
        self.logs_dir = settings.workspace / "logs"

    @property
    def name(self) -> str:
        return self.offer.name

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        try:
            self.store.register_worker(self.offer, self.settings.lease_seconds)
        except WorkerNameInUse:
            if self.settings.worker_name:  # a name given twice is a mistake to report
                raise
            # The default name (the host's) is taken by another live worker here: this one goes by
            # host-pid, and has no earlier tasks of its own to recover.
            self.offer = replace(self.offer, name=f"{self.offer.name}-{self.offer.pid}")
            self.store.register_worker(self.offer, self.settings.lease_seconds)
        self._interrupt_own(RESTART_NOTE)
        self._thread.start()
        log.info("worker %s takes tasks (%s x%d, %d MB each)", self.name, self.offer.device,
                 self.offer.device_count, self.offer.memory_mb)

    def stop(self) -> None:
        """Stop taking tasks, end running children and give their tasks back to the queue."""
        self._stop.set()
        self._thread.join(timeout=10)
        for child in self.children.values():
            _kill_group(child.process)
            child.process.wait(timeout=10)
        self._interrupt_own(f"interrupted: worker {self.name} stopped")
        self.store.unregister_worker(self.name, self.offer.pid)

    def _interrupt_own(self, note: str) -> None:
        """Tasks this worker holds (its previous run's, after a crash): back to the queue, or failed."""
        for task in self.store.held_by(self.name):
            if task.task_id in self.children and self.children[task.task_id].process.poll() is None:
                continue
            lease = Lease(task.task_id, task.lease_token)
            if not self.settings.auto_resume:
                if self.store.finish(lease, "failed", error=note):
                    self.store.append_log(task.task_id, note)
            else:
                self.store.release(lease, f"{note}: queued again to resume from its newest checkpoint")

    # -- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        next_tick = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self.settings.lease_renew_seconds
                    self._tick()
                self._reap()
                self._enforce_cancels()
                self._launch()
            except Exception:  # the worker must outlive any one bad task or database hiccup
                log.exception("worker iteration failed")
            self._stop.wait(POLL_SECONDS)

    def _tick(self) -> None:
        """Renew this worker's leases (killing the runs whose lease is lost), reclaim expired ones, beat."""
        for child in self.children.values():
            if child.lease_lost:
                continue
            cancel = self.store.renew(child.lease, self.settings.lease_seconds)
            if cancel is None:
                child.lease_lost = True
                _kill_group(child.process)
                log.warning("task %s: lease %d lost; its run (pid %d) killed, the task is another run's now",
                            child.lease.task_id, child.lease.token, child.process.pid)
            elif cancel and child.cancel_seen_at is None:
                child.cancel_seen_at = time.monotonic()
        for task_id, status in self.store.reclaim_expired(self.settings.max_reclaims):
            log.warning("task %s: its lease expired; now %s", task_id, status)
        self.store.heartbeat(self.name)

    def _launch(self) -> None:
        while len(self.children) < self.settings.max_concurrent_tasks and not self._stop.is_set():
            task = self.store.claim(self.offer, self.settings.lease_seconds)
            if task is None:
                return
            lease = Lease(task.task_id, task.lease_token)
            if task.kind == "probe":  # a no-op that exercises the queue: claimed, leased, completed
                self.store.finish(lease, "completed", progress=100.0, result={"worker": self.name})
                continue
            if missing := unseen_paths(task):
                self._refuse(task, lease, missing)
                continue
            if (previous := self.children.pop(task.task_id, None)) is not None:
                previous.process.wait()  # resumed while its last run was still exiting: let it go first
            self.children[task.task_id] = _Child(lease, self._spawn(task, lease))
            log.info("task %s (lease %d) started in process %d", task.task_id, lease.token,
                     self.children[task.task_id].process.pid)

    def _spawn(self, task: Task, lease: Lease) -> subprocess.Popen:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        env = allocator.preloaded_environment({
            **os.environ, "GPT_SERVICE_DATABASE_URL": str(self.settings.database_url),
            "GPT_SERVICE_ALLOW_DOWNLOADS": "1" if self.settings.allow_downloads else "0",
            allocator.SETTING: self.settings.malloc,
        })
        with open(self.logs_dir / f"{task.task_id}.log", "ab") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "gpt_service.tasks.runner", task.task_id, "--lease-token", str(lease.token),
                 "--lease-margin", str(lease_margin(self.settings))],
                cwd=self.settings.workspace, env=env, stdout=output, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self.store.set_pid(lease, process.pid)
        return process

    def _refuse(self, task: Task, lease: Lease, missing: list[tuple[str, str]]) -> None:
        """Fail a task whose files this machine cannot see, naming them and this worker."""
        paths = ", ".join(f"{field} {path}" for field, path in missing)
        error = (f"worker {self.name} on {self.offer.host} cannot see {paths}: datasets, base models and output "
                 "folders must be on a filesystem every worker shares")
        if self.store.finish(lease, "failed", error=error):
            self.store.append_log(task.task_id, error)

    def _reap(self) -> None:
        for task_id, child in list(self.children.items()):
            code = child.process.poll()
            if code is None:
                continue
            del self.children[task_id]
            # Every write below is fenced by the child's lease: a task reclaimed meanwhile, or
            # resumed as a new run, is left to that run.
            if child.lease_lost:
                continue
            if code == LEASE_LOST_EXIT:
                self.store.release(child.lease, "the run saw its lease about to end and stopped: queued again to "
                                   "resume from its newest checkpoint")
            elif child.killed_for_cancel:
                self.store.finish(child.lease, "cancelled")
            elif self.store.finish(child.lease, "failed", error=describe_exit(code)):
                self.store.append_log(task_id, describe_exit(code))

    def _enforce_cancels(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if child.cancel_seen_at is not None and not child.killed_for_cancel \
                    and now - child.cancel_seen_at > self.settings.cancel_grace_seconds:
                child.killed_for_cancel = True
                _kill_group(child.process)
