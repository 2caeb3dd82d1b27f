"""`GET /workers`: the workers taking tasks from this service's database, their heartbeat and their tasks."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from gpt_service.api.routes.training import Settings, Store
from gpt_service.tasks.leases import as_utc, heartbeat_age

router = APIRouter(tags=["workers"])


@router.get("/workers")
def list_workers(store: Store, settings: Settings) -> dict[str, Any]:  # type: ignore[valid-type]
    """Every registered worker; `alive` while its last heartbeat is younger than a lease."""
    records, held, now = store.workers()  # type: ignore[attr-defined]
    lease: float = settings.lease_seconds  # type: ignore[attr-defined]
    workers = []
    for record in records:
        age = heartbeat_age(record, now)
        workers.append({
            "name": record.name, "host": record.host, "pid": record.pid, "device": record.device,
            "device_count": record.device_count, "memory_gb": round(record.memory_mb / 1024, 2),
            "max_tasks": record.max_tasks, "started_at": as_utc(record.started_at).isoformat(),  # type: ignore[union-attr]
            "last_heartbeat_at": as_utc(record.heartbeat_at).isoformat(),  # type: ignore[union-attr]
            "heartbeat_age_seconds": round(age, 2), "alive": age < lease,
            "tasks": held.get(record.name, []),
        })
    return {"workers": workers}
