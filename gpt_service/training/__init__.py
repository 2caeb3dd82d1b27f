"""LoRA fine-tuning: the recipe, its checkpoints and its progress reports.

`run_lora_finetune` and the progress types load on first use, so that importing the flag
definitions (`training.arguments`) does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {"run_lora_finetune": "recipe", "TrainingProgress": "progress", "TrainingResult": "progress"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"gpt_service.training.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'gpt_service.training' has no attribute {name!r}")
