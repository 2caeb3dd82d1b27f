"""Load tokenizers and causal LMs: safetensors only, no remote code (see model_sources)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from gpt_service.model_sources import ModelSourceError, resolve_model_source

hf_logging.disable_progress_bar()


def load_tokenizer(name_or_path: str, allow_downloads: bool | None = None) -> Any:
    source, local_only = resolve_model_source(name_or_path, allow_downloads)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"cannot load the tokenizer of {name_or_path}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str, dtype: torch.dtype, device: torch.device | str = "cpu",
    allow_downloads: bool | None = None, quantization: Any = None,
) -> Any:
    """The model in `dtype` on `device`; with `quantization` (a `BitsAndBytesConfig`) its linear
    layers are quantized as they load, on that device.

    A quantized model's checkpoint is memory-mapped and its layers quantized one by one; what is
    left unquantized (embeddings, norms) is then copied out of the mapping, whose full-precision
    pages would otherwise stay resident beside the quantized weights for as long as the model
    lives. (Reading the checkpoint instead, `disable_mmap`, holds the file twice while it loads:
    a 1 GB model's load peaked 1 GB higher.)
    """
    source, local_only = resolve_model_source(name_or_path, allow_downloads)
    placement = {"quantization_config": quantization, "device_map": {"": str(device)}} if quantization else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, local_files_only=local_only, use_safetensors=True, trust_remote_code=False,
            **placement,
        )
    except (OSError, ValueError) as exc:  # custom code refused, missing files, unknown architecture
        raise ModelSourceError(f"cannot load the model {name_or_path}: {exc}") from exc
    if quantization is None:
        return model.to(device)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if type(tensor) in (torch.nn.Parameter, torch.Tensor):  # bitsandbytes' own types hold their memory
                tensor.data = tensor.data.clone()
    return model


def position_limit(model: Any) -> int | None:
    """The most positions a model's config says it takes (`max_position_embeddings`), if it says."""
    return getattr(model.config, "max_position_embeddings", None)
