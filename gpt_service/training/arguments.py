"""Command-line flags for training, derived from `TrainConfig` so flags and fields never drift.

Every field becomes `--field_name` (the spec's spelling) with a `--field-name` alias; the LoRA
block becomes `--lora_r`, `--lora_alpha`, `--target_modules`, `--lora_dropout`, `--lora_bias`;
`--quantization nf4|fp4|8bit` (or a JSON block) sets the quantization block.
Flags left out are None, so `config/models.yaml` supplies them.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from typing import Any

from gpt_service.config import DEFAULT_CONFIG_PATH, LoraSettings, TrainConfig

# torchrun's spelling beside ours.
ALIASES = {"num_processes": ["--nproc_per_node", "--nproc-per-node"]}
LORA_FLAGS = {"lora_r": "r", "lora_alpha": "lora_alpha", "target_modules": "target_modules",
              "lora_dropout": "lora_dropout", "lora_bias": "bias"}


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_modules(text: str) -> list[str] | str:
    return "all-linear" if text == "all-linear" else [m.strip() for m in text.split(",") if m.strip()]


QUANTIZATION_WORDS = {"nf4": {"bits": 4, "type": "nf4"}, "fp4": {"bits": 4, "type": "fp4"},
                      "4bit": {"bits": 4}, "8bit": {"bits": 8}, "int8": {"bits": 8}}


def _parse_quantization(text: str) -> dict[str, Any]:
    if text.lower() in QUANTIZATION_WORDS:
        return QUANTIZATION_WORDS[text.lower()]
    try:
        block = json.loads(text)
    except json.JSONDecodeError:
        block = None
    if not isinstance(block, dict):
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(QUANTIZATION_WORDS)} or a JSON block like "
            f"'{{\"bits\": 4, \"type\": \"nf4\"}}', got {text!r}")
    return block


def _flag_kwargs(annotation: Any) -> dict[str, Any]:
    kind = annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None: the X
        kind = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(kind) is typing.Literal:
        return {"choices": list(typing.get_args(kind))}
    if kind is bool:
        return {"type": _parse_bool, "nargs": "?", "const": True, "metavar": "BOOL"}
    if kind in (int, float):
        return {"type": kind}
    return {"type": str}


def _add(parser: argparse.ArgumentParser, name: str, help_text: str | None, **kwargs: Any) -> None:
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else []) + ALIASES.get(name, [])
    parser.add_argument(*names, dest=name, default=None, help=help_text, **kwargs)


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help=f"YAML file with lora_config and training defaults (default: {DEFAULT_CONFIG_PATH} "
                        "when it exists)")
    for name, field in TrainConfig.model_fields.items():
        if name == "lora_config":
            continue
        kwargs = ({"type": _parse_quantization, "metavar": "nf4|fp4|8bit|JSON"} if name == "quantization"
                  else _flag_kwargs(field.annotation))
        _add(parser, name, field.description, **kwargs)
    parser.add_argument("--estimate", action="store_true",
                        help="print the memory the run needs and has, its steps and an ETA, and exit")
    lora_fields = LoraSettings.model_fields
    for flag, key in LORA_FLAGS.items():
        kwargs = ({"type": _parse_modules, "metavar": "a,b,c|all-linear"} if key == "target_modules"
                  else _flag_kwargs(lora_fields[key].annotation))
        _add(parser, flag, lora_fields[key].description, **kwargs)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The training fields the user gave on the command line (lora flags nested)."""
    values = vars(args)
    overrides = {k: values[k] for k in TrainConfig.model_fields if values.get(k) is not None}
    lora = {key: values[flag] for flag, key in LORA_FLAGS.items() if values.get(flag) is not None}
    if lora:
        overrides["lora_config"] = lora
    return overrides
