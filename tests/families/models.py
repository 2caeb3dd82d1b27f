"""Tiny random models of ten decoder families, with the demo tokenizer, for the family matrix.

Dropout is off everywhere (GPT-2 and Phi-3 carry their own, which a tiny random model cannot learn
through), and the weights are initialised wide enough for a LoRA to make the model confident
(see DESIGN.md, "Tiny models"). Granite's logit scaling is set away from 1, so a path that ignores
it shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import GenerationConfig

from gpt_service.demo_model import EOS_TOKEN, IM_END, build_tokenizer

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 2, 4, 2, 16
COMMON: dict[str, Any] = {"hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": LAYERS,
                          "num_attention_heads": HEADS, "max_position_embeddings": 512, "initializer_range": 0.3}
GROUPED = {**COMMON, "num_key_value_heads": KV_HEADS}

# family -> (config class, its settings); `vocab_size` and the special tokens are added by `build`
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", GROUPED),
    "mistral": ("MistralConfig", {**GROUPED, "sliding_window": None}),
    "qwen2": ("Qwen2Config", {**GROUPED, "tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {**GROUPED, "head_dim": HEAD_DIM}),
    "gemma2": ("Gemma2Config", {**GROUPED, "head_dim": HEAD_DIM, "query_pre_attn_scalar": HEAD_DIM}),
    "phi3": ("Phi3Config", {**GROUPED, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0}),
    "olmo2": ("Olmo2Config", GROUPED),
    "granite": ("GraniteConfig", {**GROUPED, "logits_scaling": 2.0, "attention_multiplier": 0.25,
                                  "initializer_range": 0.45}),  # wider, against the halved logits
    "gpt_neox": ("GPTNeoXConfig", {**COMMON, "hidden_dropout": 0.0, "attention_dropout": 0.0}),
    "gpt2": ("GPT2Config", {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_positions": 512,
                            "initializer_range": 0.3, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}),
}


def build(family: str, out: Path, seed: int = 0) -> Path:
    """Save a tiny random `family` model and the demo tokenizer to `out`."""
    config_class, settings = FAMILIES[family]
    tokenizer = build_tokenizer()
    eos_ids = [tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids(IM_END)]
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), bos_token_id=None,
                                                 eos_token_id=eos_ids[0], pad_token_id=None, **settings)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=eos_ids[0], do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
