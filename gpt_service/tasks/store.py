"""The durable task store: SQLAlchemy over SQLite (WAL) by default, PostgreSQL (psycopg 3) for several hosts.

Every process (an API server, a worker, each training child) opens its own `TaskStore` on the
same URL. SQLite waits up to `busy_timeout` for a writer instead of answering "database is
locked", and WAL lets readers go on while a training writes its progress. The schema is Alembic's
(tasks/migrate.py); claims, leases and fencing live in tasks/leases.py, and every write a run makes
goes through them with its `Lease`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, delete, event, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from gpt_service.tasks import leases
from gpt_service.tasks.leases import Lease
from gpt_service.tasks.migrate import upgrade_to_head
from gpt_service.tasks.placement import WorkerOffer
from gpt_service.tasks.schema import Attempt, LogLine, MetricPoint, Task, WorkerRecord, utcnow

__all__ = ["ACTIVE", "FINISHED", "STATUSES", "Attempt", "Lease", "Task", "TaskStore", "WorkerRecord", "utcnow"]

ACTIVE = ("pending", "running")
FINISHED = ("completed", "failed", "cancelled")
STATUSES = ACTIVE + FINISHED
PROGRESS_FIELDS = ("progress", "step", "total_steps", "epoch", "loss", "eval_loss", "learning_rate",
                   "tokens_per_second", "eta_seconds")


def _make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


class TaskStore:
    """Tasks, their metrics history, their log tails, their claims and the workers that take them."""

    def __init__(self, url: str, log_tail_lines: int = 1000) -> None:
        self.engine = _make_engine(url)
        self.log_tail_lines = log_tail_lines
        upgrade_to_head(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()

    # -- tasks ------------------------------------------------------------------------------

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def create(self, task_id: str, request: dict[str, Any], output_dir: str | None, kind: str = "train",
               needs: dict[str, Any] | None = None) -> Task:
        """A pending task; `needs` are its placement columns (placement.TaskNeeds.columns())."""
        task = Task(task_id=task_id, kind=kind, status="pending", request=request, output_dir=output_dir,
                    **(needs or {}))
        with self.session() as s:
            s.add(task)
        return task

    def get(self, task_id: str) -> Task | None:
        with self.session() as s:
            return s.get(Task, task_id)

    def list(self, status: str | None = None, limit: int = 100, offset: int = 0) -> list[Task]:
        query = select(Task).order_by(Task.created_at.desc(), Task.task_id)
        if status:
            query = query.where(Task.status == status)
        with self.session() as s:
            return list(s.scalars(query.limit(limit).offset(offset)))

    def count_by_status(self) -> dict[str, int]:
        with self.session() as s:
            return dict(s.execute(select(Task.status, func.count()).group_by(Task.status)).all())

    def with_status(self, *statuses: str) -> list[Task]:
        with self.session() as s:
            return list(s.scalars(select(Task).where(Task.status.in_(statuses)).order_by(Task.created_at)))

    def active_output_dir_owner(self, output_dir: str) -> str | None:
        """The id of a pending or running task writing to `output_dir`, if any."""
        with self.session() as s:
            return s.scalar(select(Task.task_id).where(Task.output_dir == output_dir, Task.status.in_(ACTIVE)))

    def request_cancel(self, task_id: str) -> Task | None:
        """Cancel a pending task at once; flag a running one for its worker and its run to stop."""
        with self.session() as s:
            s.execute(
                update(Task).where(Task.task_id == task_id, Task.status == "pending").values(
                    status="cancelled", finished_at=utcnow(), cancel_requested=True
                )
            )
            s.execute(update(Task).where(Task.task_id == task_id, Task.status == "running")
                      .values(cancel_requested=True))
            return s.get(Task, task_id)

    def requeue(self, task_id: str, note: str) -> Task | None:
        """Queue a finished task again, to resume from its newest checkpoint."""
        with self.session() as s:
            changed = s.execute(
                update(Task).where(Task.task_id == task_id, Task.status.in_(("failed", "cancelled"))).values(
                    status="pending", resume=True, cancel_requested=False, finished_at=None, pid=None
                )
            ).rowcount
            if changed:
                s.add(LogLine(task_id=task_id, line=note))
            return s.get(Task, task_id) if changed else None

    def delete(self, task_id: str) -> None:
        with self.session() as s:
            for table in (MetricPoint, LogLine, Attempt):
                s.execute(delete(table).where(table.task_id == task_id))
            s.execute(delete(Task).where(Task.task_id == task_id))

    # -- claims and leases (tasks/leases.py) ------------------------------------------------------

    def claim(self, offer: WorkerOffer, lease_seconds: float) -> Task | None:
        with self.session() as s:
            return leases.claim(s, offer, lease_seconds)

    def renew(self, lease: Lease, lease_seconds: float) -> bool | None:
        with self.session() as s:
            return leases.renew(s, lease, lease_seconds)

    def lease_state(self, lease: Lease, margin_seconds: float) -> str:
        with self.session() as s:
            return leases.lease_state(s, lease, margin_seconds)

    def set_pid(self, lease: Lease, pid: int) -> bool:
        with self.session() as s:
            return bool(s.execute(leases.fenced(update(Task), lease).values(pid=pid)).rowcount)

    def finish(self, lease: Lease, status: str, error: str | None = None, **fields: Any) -> bool:
        """Mark a task finished if `lease` still holds it (the first verdict stands); True if it did."""
        with self.session() as s:
            return leases.finish(s, lease, status, error=error, **fields)

    def release(self, lease: Lease, note: str) -> bool:
        with self.session() as s:
            return leases.release(s, lease, note)

    def reclaim_expired(self, max_reclaims: int) -> list[tuple[str, str]]:
        with self.session() as s:
            return leases.reclaim_expired(s, max_reclaims)

    def held_by(self, name: str) -> list[Task]:
        with self.session() as s:
            return leases.held_by(s, name)

    def attempts(self, task_id: str | None = None) -> list[Attempt]:
        query = select(Attempt).order_by(Attempt.task_id, Attempt.lease_token)
        with self.session() as s:
            return list(s.scalars(query.where(Attempt.task_id == task_id) if task_id else query))

    # -- workers ------------------------------------------------------------------------------------

    def register_worker(self, offer: WorkerOffer, lease_seconds: float) -> None:
        try:
            with self.session() as s:
                leases.register(s, offer, lease_seconds)
        except IntegrityError as exc:  # another worker took the name between our read and our insert
            raise leases.WorkerNameInUse(f"a worker named {offer.name!r} registered at the same moment; give "
                                         "each worker its own --name") from exc

    def heartbeat(self, name: str) -> None:
        with self.session() as s:
            leases.heartbeat(s, name)

    def unregister_worker(self, name: str, pid: int) -> None:
        with self.session() as s:
            leases.unregister(s, name, pid)

    def workers(self) -> tuple[list[WorkerRecord], dict[str, list[str]], Any]:
        """Every registered worker, the tasks each one holds, and the database's clock now."""
        with self.session() as s:
            records = list(s.scalars(select(WorkerRecord).order_by(WorkerRecord.name)))
            held: dict[str, list[str]] = {}
            for name, task_id in s.execute(select(Task.leased_by, Task.task_id).where(Task.status == "running")):
                held.setdefault(name, []).append(task_id)
            return records, held, leases.db_now(s)

    # -- progress, metrics, logs ----------------------------------------------------------------

    def record_progress(self, lease: Lease, figures: dict[str, Any], points: list[dict[str, Any]],
                        lines: list[str]) -> bool:
        """One transaction per report, fenced: nothing is written unless `lease` still holds the task."""
        with self.session() as s:
            values = {k: figures[k] for k in PROGRESS_FIELDS if k in figures}
            if not s.execute(leases.fenced(update(Task), lease).values(updated_at=utcnow(), **values)).rowcount:
                return False
            s.add_all(MetricPoint(task_id=lease.task_id, **p) for p in points)
            s.add_all(LogLine(task_id=lease.task_id, line=line) for line in lines)
        if lines:
            self._trim_log(lease.task_id)
        return True

    def append_log(self, task_id: str, *lines: str) -> None:
        """Notes of the service itself (the worker, a reclaim) rather than of a run."""
        with self.session() as s:
            s.add_all(LogLine(task_id=task_id, line=line) for line in lines)
        self._trim_log(task_id)
    def _trim_log(self, task_id: str) -> None:
        with self.session() as s:
            cutoff = s.scalar(
                select(LogLine.id).where(LogLine.task_id == task_id).order_by(LogLine.id.desc())
                .offset(self.log_tail_lines).limit(1)
            )
            if cutoff is not None:
                s.execute(delete(LogLine).where(LogLine.task_id == task_id, LogLine.id <= cutoff))

    def metrics(self, task_id: str) -> list[dict[str, Any]]:
        with self.session() as s:
            rows = s.scalars(select(MetricPoint).where(MetricPoint.task_id == task_id).order_by(MetricPoint.id))
            points: list[dict[str, Any]] = []
            for r in rows:
                point = {"step": r.step, "epoch": r.epoch, "loss": r.loss, "eval_loss": r.eval_loss,
                         "learning_rate": r.learning_rate}
                while points and _restarts(points[-1], point):
                    points.pop()
                points.append(point)
            return points

    def log_lines(self, task_id: str, tail: int | None) -> list[str]:
        query = select(LogLine.line).where(LogLine.task_id == task_id).order_by(LogLine.id.desc())
        if tail is not None:
            query = query.limit(tail)
        with self.session() as s:
            return list(reversed(s.scalars(query).all()))


def _restarts(earlier: dict[str, Any], point: dict[str, Any]) -> bool:
    """Whether `point` replaces `earlier`: a resumed run logs again from its checkpoint's step, and the
    lost attempt's points at or past that step are not part of the task's curve."""
    same_kind = (earlier["eval_loss"] is None) == (point["eval_loss"] is None)
    return earlier["step"] > point["step"] or (earlier["step"] == point["step"] and same_kind)
