"""Typed training settings: `config/models.yaml` defaults, overridden by flags or request fields.

Precedence, lowest first: the defaults below, the YAML file, then explicit overrides (command-line
flags or `POST /train` fields). `lora_config` overrides merge key by key into the file's block.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gpt_service.errors import UserError

DatasetFormat = Literal["json", "jsonl", "txt"]
DistributedMode = Literal["ddp", "fsdp"]
DEFAULT_CONFIG_PATH = Path("config/models.yaml")


class ConfigError(UserError):
    """A settings file or override that cannot be used; the message names the key."""


class _Settings(BaseModel):
    """Unknown keys are errors, and so is true/false where a number belongs (pydantic would read 1/0)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name:
            annotation = cls.model_fields[info.field_name].annotation
            kinds = typing.get_args(annotation) or (annotation,)  # `int | None` -> (int, None)
            if bool not in kinds and (int in kinds or float in kinds):
                raise PydanticCustomError("number_type", "Input should be a number, not {value}",
                                          {"value": str(value).lower()})
        return value


class LoraSettings(_Settings):
    """The spec's `lora_config` block: PEFT `LoraConfig` arguments."""

    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description='Module names to adapt, or "all-linear" for every linear layer but the output head.',
    )
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases are trained.")


class QuantizationSettings(_Settings):
    """The frozen base loaded in 4 or 8 bits through bitsandbytes (QLoRA); LoRA stays in full precision."""

    bits: Literal[4, 8] = Field(4, description="4 (QLoRA: NF4 or FP4 blocks) or 8 (LLM.int8).")
    type: Literal["nf4", "fp4"] = Field("nf4", description="The 4-bit data type (4 bits only).")
    double_quant: bool = Field(True, description="Quantize the 4-bit blocks' scales too (4 bits only).")

    def describe(self) -> str:
        return f"4-bit {self.type}" if self.bits == 4 else "8-bit"


class TrainConfig(_Settings):
    """Everything one LoRA fine-tuning run needs. Field names are the spec's flag and request names."""

    # The spec's basic parameters.
    base_model: str = Field(..., min_length=1, description="Local model folder or Hugging Face hub id.")
    dataset_path: str = Field(..., min_length=1, description="Training data file.")
    output_dir: str | None = Field(
        None, description="Run folder; the adapter lands in <output_dir>/lora_adapter. "
        "Default: a fresh folder under models/checkpoints/."
    )
    num_epochs: int = Field(3, ge=1, le=1000, description="Passes over the training data.")
    batch_size: int = Field(4, ge=1, le=4096, description="Samples per optimizer micro-step.")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    dataset_format: DatasetFormat | None = Field(
        None, description="json, jsonl or txt; guessed from the file extension when omitted."
    )

    # The spec's advanced parameters.
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096, description="Micro-batches per update.")
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warm-up.")
    save_steps: int = Field(500, ge=1, description="Write a checkpoint every this many optimizer steps.")
    eval_steps: int = Field(500, ge=1, description="Compute the validation loss every this many steps.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 turns clipping off.")
    fp16: bool = Field(False, description="fp16 mixed precision (CUDA only; elsewhere falls back).")

    # What a user needs beside them.
    bf16: bool | None = Field(None, description="bf16 mixed precision; null = wherever the hardware has it.")
    max_length: int = Field(1024, ge=8, le=1_048_576, description="Tokens per sample; longer ones are cut.")
    validation_split: float = Field(0.1, ge=0, lt=1, description="Share of the data held out (seeded).")
    eval_dataset_path: str | None = Field(None, description="Separate validation file (overrides the split).")
    train_on_prompt: bool = Field(False, description="Also train on prompt tokens of chat/instruction data.")
    seed: int = Field(42, ge=0, description="Seed for the split, the data order, dropout and LoRA init.")
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = Field("linear", description="LR decay.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    save_total_limit: int | None = Field(3, ge=1, description="Checkpoints kept (newest); null keeps all.")
    resume_from_checkpoint: str | None = Field(
        None, description='A checkpoint folder, or "latest" for the newest one in output_dir.'
    )
    overwrite_output_dir: bool = Field(False, description="Allow writing into another run's output_dir.")
    tensorboard: bool = Field(False, description="Write TensorBoard event files to <output_dir>/runs.")
    fast_paths: bool = Field(True, description="The hand-written speed-ups (fused head loss, LoRA branch, shared "
                             "dropout masks, CPU attention); false runs plain PEFT and PyTorch, for diagnosis.")

    # Memory: see README "Memory".
    gradient_checkpointing: bool | None = Field(
        None, description="Recompute each layer's activations in the backward pass instead of keeping them: "
        "a fraction of the memory for about a third more compute. null = on when the memory estimate says the "
        "run would not fit without it.",
    )
    quantization: QuantizationSettings | None = Field(
        None, description='Load the frozen base in 4 or 8 bits (bitsandbytes), e.g. {"bits": 4, "type": "nf4", '
        '"double_quant": true}; the adapter is a normal PEFT adapter of the unquantized base.',
    )

    # More than one process (torchrun): see README "More than one GPU or machine".
    num_processes: int = Field(
        1, ge=1, le=1024, description="Training processes on this machine (torchrun --nproc_per_node); "
        "the global batch is batch_size x gradient_accumulation_steps x all processes.",
    )
    distributed: DistributedMode | None = Field(
        None, description="ddp (the base fits on each device) or fsdp (FSDP2: the base sharded across "
        "processes); null = ddp when there is more than one process.",
    )
    max_restarts: int = Field(
        0, ge=0, le=100, description="When a process dies, torchrun restarts them all this many times at most, "
        "resuming from the newest checkpoint.",
    )
    lora_config: LoraSettings = Field(default_factory=LoraSettings)

    @model_validator(mode="after")
    def _one_precision(self) -> TrainConfig:
        if self.fp16 and self.bf16:
            raise ValueError("fp16 and bf16 cannot both be true")
        return self


TRAINING_KEYS = set(TrainConfig.model_fields) - {"lora_config"}


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read `models.yaml` as a plain dict, checking that every key is one we know."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a mapping of keys, not {type(raw).__name__}")
    unknown = set(raw) - TRAINING_KEYS - {"lora_config"}
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    return raw


def build_train_config(overrides: dict[str, Any], config_path: str | Path | None = None) -> TrainConfig:
    """Merge defaults, the YAML file and `overrides` (None values are ignored).

    Without `config_path`, `config/models.yaml` is read when it exists in the working folder.
    """
    if config_path is None and DEFAULT_CONFIG_PATH.is_file():
        config_path = DEFAULT_CONFIG_PATH
    file_values = read_yaml_config(config_path) if config_path else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    merged = {**file_values, **given}
    merged["lora_config"] = {**_lora_block(file_values, f"config file {config_path}: "),
                             **_lora_block(given, "")}
    try:
        return TrainConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from exc


def _lora_block(values: dict[str, Any], where: str) -> dict[str, Any]:
    block = values.get("lora_config") or {}
    if not isinstance(block, dict):
        raise ConfigError(f"{where}lora_config: should be a mapping of LoRA settings, not {type(block).__name__}")
    return block


def describe_validation_error(exc: ValidationError) -> str:
    """One readable line per bad field: `lora_config.r: Input should be greater than or equal to 1`."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {message}")
    return "; ".join(parts)
