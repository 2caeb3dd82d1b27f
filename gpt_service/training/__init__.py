"""LoRA fine-tuning: the recipe, its checkpoints and its progress reports."""

from gpt_service.training.progress import TrainingProgress, TrainingResult
from gpt_service.training.recipe import run_lora_finetune

__all__ = ["TrainingProgress", "TrainingResult", "run_lora_finetune"]
