"""What a training run reports as it goes, and what it returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrainingProgress:
    step: int
    total_steps: int
    epoch: float  # fractional: 1.5 is half-way through the second epoch
    loss: float | None
    eval_loss: float | None
    learning_rate: float
    tokens_per_second: float
    eta_seconds: float | None
    message: str | None = None  # a log line (checkpoint written, evaluation done, ...)
    evaluated: bool = False  # eval_loss was computed at this step

    @property
    def percent(self) -> float:
        return 100.0 * self.step / self.total_steps if self.total_steps else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "progress": self.percent}


@dataclass
class TrainingResult:
    output_dir: str
    adapter_dir: str | None  # None when stopped before the end
    stopped: bool
    global_step: int
    total_steps: int
    final_loss: float | None
    final_eval_loss: float | None
    train_samples: int
    eval_samples: int
    truncated_samples: int
    history: list[dict[str, Any]] = field(default_factory=list)


ProgressCallback = Callable[[TrainingProgress], None]
StopCheck = Callable[[], bool]
