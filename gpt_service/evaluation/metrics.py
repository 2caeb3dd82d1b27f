"""Loss, perplexity and next-token accuracy over the labelled tokens (the ones training counts).

As in training (`training.loss`), the output head runs only on labelled positions, a block of rows
at a time, so the full (tokens x vocabulary) logits never exist; here each block gives both the
summed cross-entropy and the argmax hits.

A served base model holds all its adapters in one PEFT model that the generation engine also
uses, so each batch runs under the engine's model lock with the adapter asked for switched on
(or all adapters off, for the base), and the previous state is put back before the lock goes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from gpt_service.data.batching import collate, sequential_batches
from gpt_service.data.readers import DatasetError
from gpt_service.data.tokenized import TokenizedSet
from gpt_service.inference.registry import BaseModel
from gpt_service.model_loading import position_limit
from gpt_service.training.loss import FP32_BLOCK_ELEMENTS, exact_cross_entropy_sum, labelled_outputs

MAX_LOSS_FOR_PERPLEXITY = 700.0  # exp() of more overflows a float


@dataclass(frozen=True)
class TokenFigures:
    loss: float  # mean cross-entropy per labelled token, in nats
    perplexity: float  # exp(loss)
    token_accuracy: float  # share of labelled tokens the model ranks first
    tokens: int


@contextmanager
def adapter_selected(model: Any, adapter: str | None) -> Iterator[None]:
    """Run the model with only `adapter` on (None: the base alone); call with the engine's model lock held."""
    if not hasattr(model, "peft_config"):
        if adapter is not None:
            raise RuntimeError(f"adapter {adapter} is not loaded on this model")
        yield
        return
    previous = model.active_adapter
    try:
        if adapter is None:
            with model.disable_adapter():
                yield
        else:
            model.set_adapter(adapter, inference_mode=True)
            yield
    finally:  # PEFT makes the active adapter trainable when it turns adapters back on: freeze it again
        model.set_adapter(previous, inference_mode=True)


@torch.inference_mode()
def batch_scores(model: Any, batch: dict[str, torch.Tensor]) -> tuple[float, int, int]:
    """(summed cross-entropy, correct argmax predictions, labelled positions) of one collated batch."""
    rows_in, head, targets = labelled_outputs(model, batch)
    vocab = head.weight.shape[0] if head is not None else rows_in.shape[-1]
    block = max(16, FP32_BLOCK_ELEMENTS // vocab)
    loss, correct = 0.0, 0
    for start in range(0, len(targets), block):
        rows = rows_in[start : start + block]
        logits = (head(rows) if head is not None else rows).float()
        target = targets[start : start + block]
        loss += float(exact_cross_entropy_sum(logits, target))
        correct += int((logits.argmax(dim=-1) == target).sum())
    return loss, correct, len(targets)


def token_figures(base: BaseModel, adapter: str | None, examples: TokenizedSet, batch_size: int,
                  on_batch: Callable[[], None] = lambda: None) -> TokenFigures:
    """The figures of `base` with `adapter` (None: no adapter) over every labelled token of `examples`."""
    loss, correct, tokens = 0.0, 0, 0
    for indices in sequential_batches(examples.lengths, batch_size):
        batch = collate([examples[i] for i in indices], base.tokenizer.pad_token_id, position_limit(base.model))
        with base.engine.model_lock:  # the engine steps between our batches, never during one
            model = base.model
            batch = {k: v.to(model.device) for k, v in batch.items()}
            with adapter_selected(model, adapter):
                batch_loss, batch_correct, batch_tokens = batch_scores(model, batch)
        loss, correct, tokens = loss + batch_loss, correct + batch_correct, tokens + batch_tokens
        on_batch()
    if not tokens:
        raise DatasetError("no sample has an answer token left to measure (are the prompts longer than max_length?)")
    mean = loss / tokens
    return TokenFigures(mean, math.exp(min(mean, MAX_LOSS_FOR_PERPLEXITY)), correct / tokens, tokens)
