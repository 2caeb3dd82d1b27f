"""Claims, leases and fencing: how several workers share one queue without losing a task or running it twice.

- **Claim.** A worker moves the oldest pending task it fits from `pending` to `running` in one
  statement, taking a lease: `leased_by` (its name), `lease_expires_at` (database clock + lease) and
  `lease_token`, raised by one at every claim. An `Attempt` row records each claim.
- **Renew.** The worker process (never the training child) pushes `lease_expires_at` forward every
  few seconds; the answer also carries `cancel_requested`, so a cancel sent to any API server reaches
  the run wherever it is. A lease that has expired is lost, even if nobody has taken the task yet.
- **Fence.** Every write a run makes is `... WHERE task_id = ? AND lease_token = ? AND status =
  'running'`: once the task is reclaimed (or finished) the stale run's writes change nothing.
- **Reclaim.** Any worker sends tasks whose lease expired back to `pending` (to resume from their
  newest checkpoint), or fails them after `max_reclaims`.

Files are fenced by time rather than by token: a run polls its lease (`lease_state`) and exits,
writing nothing more, once the lease would end within a margin (a quarter of it) unrenewed, so it
has stopped before the lease expires and anyone can reclaim the task; checkpoints and adapters are
published atomically, so what it leaves is whole. Its worker, if it wakes, kills it too.

SQLite and PostgreSQL differ in two places only, side by side below: the clock (PostgreSQL's, since
its workers may run on several hosts; on SQLite, which is one host, that host's) and the row locks
(PostgreSQL claims with `FOR UPDATE SKIP LOCKED`, so claimers never wait on each other; SQLite
has a single writer, so the one `UPDATE ... RETURNING` is already atomic).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Select, Update, func, or_, select, update
from sqlalchemy.orm import Session

from gpt_service.errors import UserError
from gpt_service.tasks.placement import WorkerOffer, fits
from gpt_service.tasks.schema import Attempt, LogLine, Task, WorkerRecord, utcnow

LEASE_LOST_EXIT = 75  # a run that saw its lease end exits with this code, having written nothing more
QUIET = {"synchronize_session": False}  # Core-style statements: no ORM bookkeeping of loaded objects


@dataclass(frozen=True)
class Lease:
    """The right of one run to write to one task: valid while the task's token is still this one."""

    task_id: str
    token: int


class WorkerNameInUse(UserError):
    """Another live worker already goes by this name."""


# -- the two dialects ---------------------------------------------------------------------------


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def db_now(session: Session) -> datetime:
    """The clock leases are measured by: PostgreSQL's own on PostgreSQL; this host's on SQLite."""
    if is_postgres(session):
        return session.scalar(select(func.statement_timestamp()))  # type: ignore[return-value]
    return utcnow()


def skip_locked(query: Select[Any], session: Session) -> Select[Any]:
    """PostgreSQL: rows another transaction is claiming are passed over, not waited for. SQLite: one writer."""
    return query.with_for_update(skip_locked=True) if is_postgres(session) else query


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=timezone.utc)


# -- claim, renew, fence, finish ---------------------------------------------------------------


def fenced(statement: Update, lease: Lease) -> Update:
    """`statement` limited to the run that holds `lease`: a stale run's write matches no row."""
    return statement.where(Task.task_id == lease.task_id, Task.lease_token == lease.token, Task.status == "running")


def claim(session: Session, offer: WorkerOffer, lease_seconds: float) -> Task | None:
    """Take the oldest pending task `offer` fits, with a fresh lease; None when there is none."""
    now = db_now(session)
    oldest = skip_locked(
        select(Task.task_id).where(Task.status == "pending", *fits(offer))
        .order_by(Task.created_at, Task.task_id).limit(1),
        session,
    )
    row = session.execute(
        update(Task).where(Task.task_id == oldest.scalar_subquery(), Task.status == "pending").values(
            status="running", leased_by=offer.name, lease_expires_at=now + timedelta(seconds=lease_seconds),
            lease_token=Task.lease_token + 1, attempts=Task.attempts + 1, started_at=now, finished_at=None,
            error=None, cancel_requested=False, pid=None,
        ).returning(Task.task_id, Task.lease_token).execution_options(**QUIET)
    ).first()
    if row is None:
        return None
    session.add(Attempt(task_id=row.task_id, lease_token=row.lease_token, worker=offer.name, claimed_at=now))
    session.flush()
    return session.get(Task, row.task_id, populate_existing=True)


def renew(session: Session, lease: Lease, lease_seconds: float) -> bool | None:
    """Extend a live lease; the task's `cancel_requested`, or None when the lease is lost (expired or taken)."""
    now = db_now(session)
    row = session.execute(
        fenced(update(Task), lease).where(Task.lease_expires_at > now)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .returning(Task.cancel_requested).execution_options(**QUIET)
    ).first()
    return None if row is None else bool(row[0])


def lease_state(session: Session, lease: Lease, margin_seconds: float) -> str:
    """"ok", "cancel", or "lost" when the lease is gone or ends within `margin_seconds` (a run stops first)."""
    row = session.execute(
        select(Task.cancel_requested).where(Task.task_id == lease.task_id, Task.lease_token == lease.token,
                                            Task.status == "running",
                                            Task.lease_expires_at > db_now(session) + timedelta(seconds=margin_seconds))
    ).first()
    if row is None:
        return "lost"
    return "cancel" if row[0] else "ok"


def end_attempt(session: Session, lease: Lease, outcome: str) -> None:
    session.execute(
        update(Attempt).where(Attempt.task_id == lease.task_id, Attempt.lease_token == lease.token,
                              Attempt.ended_at.is_(None))
        .values(ended_at=db_now(session), outcome=outcome).execution_options(**QUIET)
    )


def finish(session: Session, lease: Lease, status: str, **fields: Any) -> bool:
    """Record the run's verdict, if it still holds the lease (the first verdict stands)."""
    changed = session.execute(
        fenced(update(Task), lease).values(status=status, finished_at=db_now(session), pid=None,
                                           lease_expires_at=None, **fields).execution_options(**QUIET)
    ).rowcount
    if changed:
        end_attempt(session, lease, status)
    return bool(changed)


def release(session: Session, lease: Lease, note: str) -> bool:
    """The holder gives the task back to the queue, to resume from its newest checkpoint on any worker."""
    changed = session.execute(
        fenced(update(Task), lease).values(status="pending", resume=True, leased_by=None, lease_expires_at=None,
                                           pid=None).execution_options(**QUIET)
    ).rowcount
    if changed:
        end_attempt(session, lease, "released")
        session.add(LogLine(task_id=lease.task_id, line=note))
    return bool(changed)


# -- reclaim -------------------------------------------------------------------------------------


def reclaim_expired(session: Session, max_reclaims: int) -> list[tuple[str, str]]:
    """Tasks whose lease expired go back to pending (to resume), or fail after `max_reclaims`: [(id, status)]."""
    now = db_now(session)
    expired = skip_locked(
        select(Task).where(Task.status == "running",
                           or_(Task.lease_expires_at < now, Task.lease_expires_at.is_(None))),  # NULL: 0.1.0's
        session,
    )
    done = []
    for task in session.scalars(expired).all():
        lease = Lease(task.task_id, task.lease_token)
        holder = task.leased_by or "a server of an earlier release"
        if task.reclaims >= max_reclaims:
            status, values = "failed", {"error": f"the lease of {holder} expired and the task was already reclaimed "
                                                 f"{task.reclaims} times (max_reclaims); giving up",
                                        "finished_at": now}
            note = f"lease of {holder} expired; failed after {task.reclaims} reclaims"
        else:
            status, values = "pending", {"resume": True, "reclaims": Task.reclaims + 1, "leased_by": None}
            note = (f"lease of {holder} expired (its worker stopped or lost the database): queued again to resume "
                    f"from the newest checkpoint (reclaim {task.reclaims + 1} of at most {max_reclaims})")
        changed = session.execute(
            fenced(update(Task), lease).values(status=status, lease_expires_at=None, pid=None, **values)
            .execution_options(**QUIET)
        ).rowcount
        if changed:
            end_attempt(session, lease, "lease expired")
            session.add(LogLine(task_id=task.task_id, line=note))
            done.append((task.task_id, status))
    return done


def held_by(session: Session, name: str) -> list[Task]:
    """The running tasks whose lease `name` holds (or held: expired and not yet reclaimed)."""
    return list(session.scalars(select(Task).where(Task.status == "running", Task.leased_by == name)))


# -- workers -------------------------------------------------------------------------------------


def _is_live_process(pid: int) -> bool:
    """A live gpt-service process with this id on this host."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"gpt_service" in command or b"gpt-service" in command


def heartbeat_age(record: WorkerRecord, now: datetime) -> float:
    """Seconds since the worker's last heartbeat, by the database's clock."""
    return max((as_utc(now) - as_utc(record.heartbeat_at)).total_seconds(), 0.0)  # type: ignore[operator]


def register(session: Session, offer: WorkerOffer, lease_seconds: float) -> None:
    """Announce `offer` under its name; refused while another live worker has that name.

    A record left by this worker's previous run (same host, its process gone) is taken over:
    the name is the worker's identity across restarts, and its tasks are its own to recover.
    """
    now = db_now(session)
    record = session.get(WorkerRecord, offer.name, with_for_update=is_postgres(session))
    if record is not None:
        beat = as_utc(record.heartbeat_at)
        fresh = beat is not None and beat + timedelta(seconds=lease_seconds) > now
        mine = record.host == offer.host and (record.pid == offer.pid or not _is_live_process(record.pid))
        if fresh and not mine:
            raise WorkerNameInUse(
                f"a worker named {offer.name!r} is alive on {record.host} (pid {record.pid}); give each worker its "
                "own --name"
            )
        session.delete(record)
        session.flush()
    session.add(WorkerRecord(name=offer.name, host=offer.host, pid=offer.pid, device=offer.device,
                             device_count=offer.device_count, memory_mb=offer.memory_mb, max_tasks=offer.max_tasks,
                             started_at=now, heartbeat_at=now))


def heartbeat(session: Session, name: str) -> None:
    session.execute(update(WorkerRecord).where(WorkerRecord.name == name)
                    .values(heartbeat_at=db_now(session)).execution_options(**QUIET))


def unregister(session: Session, name: str, pid: int) -> None:
    session.execute(WorkerRecord.__table__.delete().where(WorkerRecord.name == name, WorkerRecord.pid == pid))
