"""The durable task store: SQLAlchemy over SQLite (WAL) by default, any SQLAlchemy URL by choice.

Every process (the API, the worker thread, each training child) opens its own `TaskStore` on the
same URL. SQLite waits up to `busy_timeout` for a writer instead of answering "database is
locked", and WAL lets readers go on while a training writes its progress.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

ACTIVE = ("pending", "running")
FINISHED = ("completed", "failed", "cancelled")
STATUSES = ACTIVE + FINISHED
PROGRESS_FIELDS = ("progress", "step", "total_steps", "epoch", "loss", "eval_loss", "learning_rate",
                   "tokens_per_second", "eta_seconds")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Task(Base):
    __tablename__ = "tasks"

    task_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="train")
    status: Mapped[str] = mapped_column(String(16), index=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    output_dir: Mapped[str | None] = mapped_column(Text)
    adapter_path: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    epoch: Mapped[float | None] = mapped_column(Float)
    loss: Mapped[float | None] = mapped_column(Float)
    eval_loss: Mapped[float | None] = mapped_column(Float)
    learning_rate: Mapped[float | None] = mapped_column(Float)
    tokens_per_second: Mapped[float | None] = mapped_column(Float)
    eta_seconds: Mapped[float | None] = mapped_column(Float)
    pid: Mapped[int | None] = mapped_column(Integer)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    resume: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class MetricPoint(Base):
    __tablename__ = "task_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.task_id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[float | None] = mapped_column(Float)
    loss: Mapped[float | None] = mapped_column(Float)
    eval_loss: Mapped[float | None] = mapped_column(Float)
    learning_rate: Mapped[float | None] = mapped_column(Float)


class LogLine(Base):
    __tablename__ = "task_logs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.task_id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    line: Mapped[str] = mapped_column(Text)


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
    """Tasks, their metrics history and their log tails."""

    def __init__(self, url: str, log_tail_lines: int = 1000) -> None:
        self.engine = _make_engine(url)
        self.log_tail_lines = log_tail_lines
        Base.metadata.create_all(self.engine)
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

    def create(self, task_id: str, request: dict[str, Any], output_dir: str | None, kind: str = "train") -> Task:
        task = Task(task_id=task_id, kind=kind, status="pending", request=request, output_dir=output_dir)
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

    def claim_next(self) -> Task | None:
        """Atomically move the oldest pending task to running and return it."""
        with self.session() as s:
            candidate = s.scalar(
                select(Task.task_id).where(Task.status == "pending").order_by(Task.created_at).limit(1)
            )
            if candidate is None:
                return None
            claimed = s.execute(
                update(Task).where(Task.task_id == candidate, Task.status == "pending").values(
                    status="running", started_at=utcnow(), finished_at=None, error=None,
                    cancel_requested=False, attempts=Task.attempts + 1,
                )
            ).rowcount
            return s.get(Task, candidate) if claimed else None

    def set_fields(self, task_id: str, **fields: Any) -> None:
        with self.session() as s:
            s.execute(update(Task).where(Task.task_id == task_id).values(**fields))

    def finish(self, task_id: str, status: str, error: str | None = None, pid: int | None = None,
               **fields: Any) -> bool:
        """Mark a task finished, unless it already is (the first verdict stands); True if it was active.

        With `pid`, only while the task is still that process's run.
        """
        query = update(Task).where(Task.task_id == task_id, Task.status.in_(ACTIVE))
        if pid is not None:
            query = query.where(Task.pid == pid)
        with self.session() as s:
            return bool(s.execute(query.values(status=status, error=error, finished_at=utcnow(), pid=None,
                                               **fields)).rowcount)

    def request_cancel(self, task_id: str) -> Task | None:
        """Cancel a pending task at once; flag a running one for its process to stop."""
        with self.session() as s:
            s.execute(
                update(Task).where(Task.task_id == task_id, Task.status == "pending").values(
                    status="cancelled", finished_at=utcnow(), cancel_requested=True
                )
            )
            s.execute(update(Task).where(Task.task_id == task_id, Task.status == "running")
                      .values(cancel_requested=True))
            return s.get(Task, task_id)

    def cancel_requested(self, task_id: str) -> bool:
        with self.session() as s:
            return bool(s.scalar(select(Task.cancel_requested).where(Task.task_id == task_id)))

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
            s.execute(delete(MetricPoint).where(MetricPoint.task_id == task_id))
            s.execute(delete(LogLine).where(LogLine.task_id == task_id))
            s.execute(delete(Task).where(Task.task_id == task_id))

    # -- progress, metrics, logs ----------------------------------------------------------------

    def record_progress(self, task_id: str, figures: dict[str, Any], points: list[dict[str, Any]],
                        lines: list[str]) -> None:
        """One transaction per report: the latest figures, new metric points and new log lines."""
        with self.session() as s:
            values = {k: figures[k] for k in PROGRESS_FIELDS if k in figures}
            if values:
                s.execute(update(Task).where(Task.task_id == task_id).values(**values))
            s.add_all(MetricPoint(task_id=task_id, **p) for p in points)
            s.add_all(LogLine(task_id=task_id, line=line) for line in lines)
        if lines:
            self._trim_log(task_id)

    def append_log(self, task_id: str, *lines: str) -> None:
        self.record_progress(task_id, {}, [], list(lines))

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
            return [{"step": r.step, "epoch": r.epoch, "loss": r.loss, "eval_loss": r.eval_loss,
                     "learning_rate": r.learning_rate} for r in rows]

    def log_lines(self, task_id: str, tail: int | None) -> list[str]:
        query = select(LogLine.line).where(LogLine.task_id == task_id).order_by(LogLine.id.desc())
        if tail is not None:
            query = query.limit(tail)
        with self.session() as s:
            return list(reversed(s.scalars(query).all()))
