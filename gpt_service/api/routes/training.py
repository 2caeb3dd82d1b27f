"""The spec's training calls: submit, status, history; plus cancel, resume, logs, metrics, delete."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from gpt_service.api.responses import errors
from gpt_service.api.schemas import MemoryAnswer, TrainAccepted, TrainRequest, task_view
from gpt_service.config import TrainConfig
from gpt_service.paths import confine
from gpt_service.settings import ServiceSettings
from gpt_service.tasks.leases import heartbeat_age
from gpt_service.tasks.placement import PLACEMENT_KEYS, TaskNeeds
from gpt_service.tasks.schema import WorkerRecord
from gpt_service.tasks.store import ACTIVE, STATUSES, Task, TaskStore
from gpt_service.tasks.submission import ConflictError, NotFoundError, prepare_training

router = APIRouter(tags=["training"])
# OpenAPI links from a new task's id to the calls that take it (clients and API testers follow them).
TASK_LINKS = {
    name: {"operationRef": f"#/paths/{path.replace('/', '~1')}/{method}",
           "parameters": {"task_id": "$response.body#/task_id"}}
    for name, method, path in [("status", "get", "/train/status/{task_id}"), ("logs", "get", "/train/{task_id}/logs"),
                               ("metrics", "get", "/train/{task_id}/metrics"),
                               ("config", "get", "/train/{task_id}/config"),
                               ("cancel", "post", "/train/{task_id}/cancel"),
                               ("resume", "post", "/train/{task_id}/resume")]
}
_submit_lock = threading.Lock()  # the output_dir check and the insert happen as one


def get_store(request: Request) -> TaskStore:
    return request.app.state.store


def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


Store = Annotated[TaskStore, Depends(get_store)]
Settings = Annotated[ServiceSettings, Depends(get_settings)]


def existing_task(task_id: str, store: TaskStore) -> Task:
    task = store.get(task_id)
    if task is None:
        raise NotFoundError(f"no training task {task_id!r}; GET /train/history lists the tasks")
    return task


def fitting_workers(needs: TaskNeeds, store: TaskStore, lease_seconds: float) -> list[WorkerRecord]:
    """The live workers that offer what the task needs."""
    records, _, now = store.workers()
    return [r for r in records
            if heartbeat_age(r, now) < lease_seconds and needs.met_by(r.device, r.device_count, r.memory_mb)]


def refuse_what_cannot_fit(config: TrainConfig, workers: list[WorkerRecord]) -> None:
    """Refuse now a run that no live worker has the memory for, even with checkpointing and a 4-bit
    base, rather than let it die of an out-of-memory later. Only the floor that needs neither the data
    nor a probe is weighed here (the answer stays quick); the worker weighs the rest. With no live
    worker, the task waits."""
    if not workers:
        return
    from gpt_service.training.memory import least_bytes, refuse_beyond  # torch: only when there is a run to weigh

    largest = max(workers, key=lambda r: r.memory_mb)
    refuse_beyond(least_bytes(config), largest.memory_mb * 2**20, f"the largest worker ({largest.name})",
                  "the base's weights, the LoRA state and the runtime, before any activations")


def placement_warning(needs: TaskNeeds, workers: list[WorkerRecord]) -> str | None:
    """Why the task may wait: no live worker offers what it needs (one may join later, so it is queued)."""
    if workers:
        return None
    return (f"no live worker offers {needs.describe()} now; the task waits until one that does takes it "
            "(GET /workers lists the workers)")


@router.post("/train", response_model=TrainAccepted, response_model_exclude_none=True,
             responses={200: {"links": TASK_LINKS}, **errors(400, 403, 404, 409, 413, 422)})
def submit_training(body: TrainRequest, store: Store, settings: Settings) -> dict[str, Any]:  # type: ignore[valid-type]
    task_id = store.new_id()
    fields = body.model_dump(exclude_none=True)  # type: ignore[attr-defined]
    needs = TaskNeeds.from_request(fields)
    training = {k: v for k, v in fields.items() if k not in PLACEMENT_KEYS or k in TrainConfig.model_fields}
    config = prepare_training(training, settings, task_id)  # type: ignore[attr-defined]
    workers = fitting_workers(needs, store, settings.lease_seconds)  # type: ignore[attr-defined]
    refuse_what_cannot_fit(config, workers)
    with _submit_lock:
        owner = store.active_output_dir_owner(str(config.output_dir))
        if owner:
            raise ConflictError(f"output_dir {config.output_dir} is in use by task {owner}; wait for it or cancel it")
        store.create(task_id, config.model_dump(mode="json"), config.output_dir, needs=needs.columns())
    return {"task_id": task_id, "status": "pending", "output_dir": config.output_dir,
            "warning": placement_warning(needs, workers)}


@router.post("/train/estimate", response_model=MemoryAnswer, responses=errors(400, 403, 404, 422))
def estimate_training(body: TrainRequest, settings: Settings) -> dict[str, Any]:  # type: ignore[valid-type]
    """The memory the training would need (and have, on this machine), its steps and an ETA; nothing is run."""
    fields = body.model_dump(exclude_none=True)  # type: ignore[attr-defined]
    training = {k: v for k, v in fields.items() if k not in PLACEMENT_KEYS or k in TrainConfig.model_fields}
    config = prepare_training(training, settings, "estimate")  # type: ignore[attr-defined]
    from gpt_service.training.memory import estimate_memory

    return estimate_memory(config).as_dict()


@router.get("/train/status/{task_id}", responses=errors(404))
def training_status(task_id: str, store: Store) -> dict[str, Any]:
    return task_view(existing_task(task_id, store))


@router.get("/train/history", responses=errors(422))
def training_history(
    store: Store,
    status: Annotated[str | None, Query(pattern="^(" + "|".join(STATUSES) + ")$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
) -> dict[str, Any]:
    return {"tasks": [task_view(t) for t in store.list(status, limit, offset)]}


@router.post("/train/{task_id}/cancel", responses=errors(404))
def cancel_training(task_id: str, store: Store) -> dict[str, Any]:
    existing_task(task_id, store)
    return task_view(store.request_cancel(task_id))  # type: ignore[arg-type]


@router.post("/train/{task_id}/resume", responses=errors(404, 409))
def resume_training(task_id: str, store: Store) -> dict[str, Any]:
    task = existing_task(task_id, store)
    if task.status not in ("failed", "cancelled"):
        raise ConflictError(f"task {task_id} is {task.status}; only a failed or cancelled task can be resumed")
    owner = store.active_output_dir_owner(str(task.output_dir))
    if owner:
        raise ConflictError(f"output_dir {task.output_dir} is in use by task {owner}")
    resumed = store.requeue(task_id, "resume requested: queued to continue from its newest checkpoint")
    if resumed is None:
        raise ConflictError(f"task {task_id} changed state meanwhile; look at its status and try again")
    return task_view(resumed)


@router.get("/train/{task_id}/logs", responses=errors(404, 422))
def training_logs(
    task_id: str, store: Store,
    tail: Annotated[int, Query(ge=1, le=100_000)] = 100, all: bool = False,
) -> dict[str, Any]:
    existing_task(task_id, store)
    return {"task_id": task_id, "lines": store.log_lines(task_id, None if all else tail)}


@router.get("/train/{task_id}/metrics", responses=errors(404))
def training_metrics(task_id: str, store: Store) -> dict[str, Any]:
    existing_task(task_id, store)
    points = store.metrics(task_id)
    return {
        "task_id": task_id,
        "loss": [{"step": p["step"], "epoch": p["epoch"], "value": p["loss"]} for p in points if p["loss"] is not None],
        "eval_loss": [{"step": p["step"], "epoch": p["epoch"], "value": p["eval_loss"]}
                      for p in points if p["eval_loss"] is not None],
        "learning_rate": [{"step": p["step"], "value": p["learning_rate"]} for p in points],
    }


@router.delete("/train/{task_id}", responses=errors(403, 404, 409, 422))
def delete_training(task_id: str, store: Store, settings: Settings, delete_files: bool = False) -> dict[str, Any]:
    task = existing_task(task_id, store)
    if task.status in ACTIVE:
        raise ConflictError(f"task {task_id} is {task.status}; cancel it before deleting it")
    removed = None
    if delete_files and task.output_dir and Path(task.output_dir).exists():
        folder = confine(task.output_dir, settings.workspace, settings.models_root, "output_dir")
        shutil.rmtree(folder)
        removed = str(folder)
    store.delete(task_id)
    return {"task_id": task_id, "deleted": True, "files_removed": removed}
