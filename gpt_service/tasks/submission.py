"""Checks made when a training is submitted, so a user learns at once what to fix.

Turns a request into a complete `TrainConfig` whose paths are resolved and confined to their roots:
datasets under the data root, models and outputs under the models root. No torch here.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from gpt_service.config import TrainConfig, build_train_config
from gpt_service.data.readers import guess_format
from gpt_service.errors import UserError
from gpt_service.model_sources import check_local_model_dir, resolve_model_source
from gpt_service.paths import check_path_text, confine
from gpt_service.quantization import check_available
from gpt_service.settings import ServiceSettings


class NotFoundError(UserError):
    """Something named in a request that does not exist."""


class ConflictError(UserError):
    """A request that clashes with the state of another task or of the disk."""


def dataset_file(raw: str, settings: ServiceSettings, what: str, dataset_format: str | None) -> Path:
    """A readable regular file under the data root, in a format we know."""
    path = confine(raw, settings.workspace, settings.data_root, what)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as exc:
        raise NotFoundError(f"{what} {raw!r} does not exist") from exc
    if not stat.S_ISREG(mode):
        raise UserError(f"{what} {raw!r} is not a regular file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{what} {raw!r} is not readable")
    guess_format(path, dataset_format)
    return path


def looks_like_path(raw: str, settings: ServiceSettings) -> bool:
    """A folder name rather than a hub id: absolute, relative-looking, existing, or under models/."""
    parts = Path(raw).parts
    return (raw.startswith(("/", ".", "~")) or ".." in parts or (settings.workspace / raw).exists()
            or parts[:1] == (settings.models_root.name,))


def model_location(raw: str, settings: ServiceSettings, what: str) -> str:
    """A model folder under the models root, or a hub id that may be loaded."""
    check_path_text(raw, what)
    if looks_like_path(raw, settings):
        path = confine(raw, settings.workspace, settings.models_root, what)
        if not path.is_dir():
            raise NotFoundError(f"{what} {raw!r} is not a model folder")
        check_local_model_dir(path)
        return str(path)
    source, _ = resolve_model_source(raw, settings.allow_downloads)
    return source


def adapter_folder(raw: str | None, settings: ServiceSettings) -> str | None:
    """A LoRA adapter folder under the models root (None when not given)."""
    if not raw:
        return None
    folder = confine(raw, settings.workspace, settings.models_root, "lora_adapter")
    if not folder.is_dir():
        raise NotFoundError(f"lora_adapter {raw!r} is not a folder")
    return str(folder)


def output_folder(raw: str, settings: ServiceSettings, config: TrainConfig) -> Path:
    path = confine(raw, settings.workspace, settings.models_root, "output_dir")
    if path.exists() and not path.is_dir():
        raise ConflictError(f"output_dir {raw!r} exists and is not a folder")
    fresh = not path.exists() or not any(path.iterdir())
    if not (fresh or config.resume_from_checkpoint or config.overwrite_output_dir):
        raise ConflictError(
            f"output_dir {raw!r} already holds another run's files; choose a new output_dir, or set "
            "resume_from_checkpoint or overwrite_output_dir"
        )
    return path


def prepare_training(body: dict[str, Any], settings: ServiceSettings, task_id: str) -> TrainConfig:
    """The task's full config: request fields over config/models.yaml, paths checked and resolved."""
    config_file = settings.config_path if settings.config_path and settings.config_path.is_file() else None
    config = build_train_config(body, config_file or "")
    if config.quantization:
        check_available()
    dataset = dataset_file(config.dataset_path, settings, "dataset_path", config.dataset_format)
    eval_dataset = (dataset_file(config.eval_dataset_path, settings, "eval_dataset_path", config.dataset_format)
                    if config.eval_dataset_path else None)
    output_raw = config.output_dir or str(settings.models_root / "checkpoints" / task_id)
    output = output_folder(output_raw, settings, config)
    resume = config.resume_from_checkpoint
    if resume and resume != "latest":
        resume = str(confine(resume, settings.workspace, settings.models_root, "resume_from_checkpoint"))
    return config.model_copy(update={
        "base_model": model_location(config.base_model, settings, "base_model"),
        "dataset_path": str(dataset), "eval_dataset_path": str(eval_dataset) if eval_dataset else None,
        "output_dir": str(output), "resume_from_checkpoint": resume,
    })
