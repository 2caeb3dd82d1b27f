"""`gpt-service export --adapter DIR --merge OUT`: the base model with the adapter merged in.

The result is a plain model folder (safetensors, config, generation config, tokenizer) that any
server loads without PEFT. To serve adapters unmerged on a larger machine, vLLM reads our adapter
folders as they are (`vllm serve BASE --enable-lora --lora-modules name=DIR`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoTokenizer

from gpt_service.errors import UserError
from gpt_service.inference.registry import check_adapter
from gpt_service.model_loading import load_causal_lm, load_tokenizer


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, base_model: str | None = None,
                  overwrite: bool = False) -> Path:
    """Write base + adapter, merged, to `out_dir`; return it."""
    adapter, out = Path(adapter_dir), Path(out_dir)
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"{adapter} is not a LoRA adapter folder (it has no adapter_config.json)")
    base = base_model or json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{config_file} does not name its base model; pass --base-model")
    check_adapter(adapter, base)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} is not empty; choose another folder or pass --overwrite")
    model = load_causal_lm(base, torch.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    if (adapter / "tokenizer_config.json").is_file():  # the tokenizer the adapter was trained with
        tokenizer = AutoTokenizer.from_pretrained(adapter, local_files_only=True, trust_remote_code=False)
    else:
        tokenizer = load_tokenizer(base)
    tokenizer.save_pretrained(out)
    return out
