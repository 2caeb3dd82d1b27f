"""Placement: what a worker offers, what a task needs, and whether a worker can see a task's files.

A worker advertises its device kind, device count and memory per device (found without torch, so
the API process that hosts a built-in worker never imports it; flags override what is found). A
task may ask for a `device`, a `num_processes` and a `min_memory_gb`; only a worker that fits
claims it (the filter is part of the claim's SQL, `fits`).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import ColumnElement, or_

from gpt_service.config import ConfigError, describe_validation_error
from gpt_service.tasks.schema import Task

PLACEMENT_KEYS = ("device", "num_processes", "min_memory_gb")


class TaskNeeds(BaseModel):
    """What a task asks of the worker that runs it (request fields beside the training's)."""

    model_config = ConfigDict(extra="ignore")

    device: Literal["cpu", "cuda"] | None = Field(None, description="Run only on a worker with this device kind.")
    num_processes: int = Field(1, ge=1, le=1024, description="Devices (processes) the task needs on one worker.")
    min_memory_gb: float | None = Field(None, gt=0, description="Memory per device the task needs, in GB.")

    @classmethod
    def from_request(cls, fields: dict[str, Any]) -> TaskNeeds:
        """The needs in a request's fields; out-of-range values are a ConfigError (a 422) naming the field."""
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from exc

    def met_by(self, device: str, device_count: int, memory_mb: int) -> bool:
        """The same test as the claim's SQL (`fits`), on one worker's offer."""
        return ((self.device is None or self.device == device) and self.num_processes <= device_count
                and (self.min_memory_gb is None or self.min_memory_gb * 1024 <= memory_mb))

    def describe(self) -> str:
        memory = f", {self.min_memory_gb:g} GB each" if self.min_memory_gb else ""
        kind = f"{self.device} " if self.device else ""
        return f"{self.num_processes} {kind}device{'s' if self.num_processes > 1 else ''}{memory}"

    def columns(self) -> dict[str, Any]:
        memory = None if self.min_memory_gb is None else int(self.min_memory_gb * 1024)
        return {"need_device": self.device, "need_processes": self.num_processes, "need_memory_mb": memory}


@dataclass(frozen=True)
class WorkerOffer:
    """One worker: its name (its identity across restarts), where it runs, and what it offers."""

    name: str
    host: str
    pid: int
    device: str
    device_count: int
    memory_mb: int
    max_tasks: int


def _gpu_memory_mb() -> int | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return min(int(float(line)) for line in out.split())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def detect_devices() -> tuple[str, int, int]:
    """(device kind, count, memory in MB) of this machine: CUDA GPUs if any, else the CPU cores (a
    training on several processes runs one gloo rank per core)."""
    gpus = [p for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)]
    if gpus and (memory := _gpu_memory_mb()):
        return "cuda", len(gpus), memory
    return "cpu", os.cpu_count() or 1, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20


def make_offer(name: str | None, max_tasks: int, device: str | None = None, device_count: int | None = None,
               memory_gb: float | None = None) -> WorkerOffer:
    found_device, found_count, found_memory = detect_devices()
    return WorkerOffer(
        name=name or socket.gethostname(), host=socket.gethostname(), pid=os.getpid(),
        device=device or found_device, device_count=device_count or found_count,
        memory_mb=int(memory_gb * 1024) if memory_gb else found_memory, max_tasks=max_tasks,
    )


def fits(offer: WorkerOffer) -> list[ColumnElement[bool]]:
    """The claim's WHERE clauses: the task's needs are met by `offer`."""
    return [
        or_(Task.need_device.is_(None), Task.need_device == offer.device),
        Task.need_processes <= offer.device_count,
        or_(Task.need_memory_mb.is_(None), Task.need_memory_mb <= offer.memory_mb),
    ]


def unseen_paths(task: Task) -> list[tuple[str, str]]:
    """(field, path) of a task's inputs this machine cannot see: they must be on a shared filesystem."""
    request = task.request or {}
    wanted = [("dataset_path", request.get("dataset_path")), ("eval_dataset_path", request.get("eval_dataset_path"))]
    base = request.get("base_model")
    if isinstance(base, str) and base.startswith("/"):  # submission resolved a local folder to its full path
        wanted.append(("base_model", base))
    adapter = request.get("lora_adapter")
    if isinstance(adapter, str):
        wanted.append(("lora_adapter", adapter))
    return [(field, path) for field, path in wanted if isinstance(path, str) and not Path(path).exists()]
