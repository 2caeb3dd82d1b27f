"""Request and response bodies of the training API."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, create_model

from gpt_service.config import LoraSettings, TrainConfig
from gpt_service.tasks.placement import TaskNeeds
from gpt_service.tasks.store import Task


def _all_optional(model: type[BaseModel], name: str, required: tuple[str, ...] = (),
                  **replace: Any) -> type[BaseModel]:
    """`model`'s fields as a request body: types checked here, ranges by the full config later."""
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        if field_name in replace:
            fields[field_name] = replace[field_name]
        elif field_name in required:
            fields[field_name] = (info.annotation, ...)
        else:
            fields[field_name] = (info.annotation | None, None)
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


LoraOverrides = _all_optional(LoraSettings, "LoraOverrides")
_TrainFields = _all_optional(
    TrainConfig, "_TrainFields", required=("base_model", "dataset_path"), lora_config=(LoraOverrides | None, None)
)
_NeedsFields = _all_optional(TaskNeeds, "_NeedsFields")


class TrainRequest(_TrainFields, _NeedsFields):  # type: ignore[misc, valid-type]
    """The training's fields and what the task needs of a worker (`device`, `num_processes`, `min_memory_gb`)."""


class MemoryAnswer(BaseModel):
    """POST /train/estimate: per training process, in GB; `needed_gb` counts all processes of a CPU run."""

    device: str
    processes: int
    quantization: str | None
    gradient_checkpointing: bool  # as the run would go: as asked, or on where keeping activations would not fit
    longest_batch: list[int]  # rows, positions
    weights_gb: float
    lora_gb: float
    activations_gb: float
    activations_without_checkpointing_gb: float
    activations_with_checkpointing_gb: float
    head_gb: float
    runtime_gb: float
    loading_gb: float  # a quantized base loading on a CPU reads one whole checkpoint file; 0 otherwise
    smallest_gb: float  # with checkpointing and a 4-bit base
    available_gb: float
    peak_gb: float
    needed_gb: float
    least_needed_gb: float  # smallest_gb, for all processes
    fits: bool
    total_steps: int
    eta_seconds: float | None


class TrainAccepted(BaseModel):
    task_id: str
    status: str
    output_dir: str | None
    warning: str | None = None  # e.g. no live worker can run the task now (it waits for one)


def task_view(task: Task) -> dict[str, Any]:
    """What status, history and the console show of a task."""
    request = task.request or {}
    return {
        "task_id": task.task_id, "kind": task.kind, "status": task.status, "progress": round(task.progress, 4),
        "current_step": task.step, "total_steps": task.total_steps, "epoch": task.epoch, "loss": task.loss,
        "eval_loss": task.eval_loss, "learning_rate": task.learning_rate,
        "tokens_per_second": task.tokens_per_second, "eta_seconds": task.eta_seconds,
        "base_model": request.get("base_model"), "dataset_path": request.get("dataset_path"),
        "output_dir": task.output_dir, "adapter_path": task.adapter_path, "error": task.error,
        "result": task.result, "attempts": task.attempts, "cancel_requested": task.cancel_requested,
        "worker": task.leased_by, "reclaims": task.reclaims,
        "needs": {"device": task.need_device, "num_processes": task.need_processes,
                  "min_memory_gb": None if task.need_memory_mb is None else task.need_memory_mb / 1024},
        "created_at": task.created_at.isoformat() if task.created_at else None,
        "started_at": task.started_at.isoformat() if task.started_at else None,
        "finished_at": task.finished_at.isoformat() if task.finished_at else None,
    }
