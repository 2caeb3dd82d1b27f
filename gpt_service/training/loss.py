"""Causal-LM loss computed only where there are labels.

`model(**batch).logits` projects every position onto the vocabulary; with a 32k vocabulary the
output head is then close to half the compute of a small model. Here the head runs only on the
positions that have a label (answers only, no padding), and the cross-entropy is summed so that
gradient accumulation can normalise by the true token count of the whole accumulated batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gpt_service.data.examples import IGNORE_INDEX


def _head_applies_plainly(model: Any) -> bool:
    """False for models whose logits are more than `lm_head(hidden)` (soft-capping, scaling)."""
    config = model.config
    return not (getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None))


def summed_token_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over labelled positions, number of those positions)."""
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    n_tokens = int(mask.sum())
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    if _head_applies_plainly(base) and decoder is not base:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = base.get_output_embeddings()(hidden[:, :-1][mask])
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
    loss = F.cross_entropy(logits.float(), targets[mask], reduction="sum")
    return loss, n_tokens
