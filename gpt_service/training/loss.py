"""Causal-LM loss computed only where there are labels.

`model(**batch).logits` projects every position onto the vocabulary; with a 32k vocabulary the
output head is then close to half the compute of a small model. Here the head runs only on the
positions that have a label (answers only, no padding), and the cross-entropy is summed so that
gradient accumulation can normalise by the true token count of the whole accumulated batch.

When the head is a frozen plain linear layer (always, for LoRA on the usual target modules), the
head and the cross-entropy run fused, a block of rows at a time: each block's logits live only
while that block is worked on, and the gradient with respect to the hidden states is computed
right there, so the full (tokens x vocabulary) logits are never stored, upcast, or read back by a
separate backward. On a CPU that leaves little but the two matrix multiplies: the head-plus-loss
step takes about half the time of `cross_entropy(lm_head(hidden).float())`.
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpt_service.data.batching import round_up
from gpt_service.data.tokenized import IGNORE_INDEX

# Logit elements per block at most (bf16: 16 MiB, 256 rows at a 32k vocabulary): what stays in a
# CPU's last-level cache between the matrix multiply, the softmax and the gradient's matrix
# multiply; 512-row blocks make the head 15% slower.
BLOCK_ELEMENTS = 1 << 23
# Without a gradient the logits are upcast to fp32; blocks of 64 rows (at 32k) stay in the CPU's
# cache between the upcast and the log-sum-exp, which makes that path 1.6x faster.
FP32_BLOCK_ELEMENTS = 1 << 21
# Blocks are a multiple of this many rows (the last one padded with zero rows): oneDNN builds a
# matrix-multiply kernel for each new shape, which costs more than the padding (see batching.py).
_ROW_MULTIPLE = 32
# A target probability below this is recomputed exactly instead of read from the low-precision softmax.
_TINY_PROBABILITY = 1e-30

log = logging.getLogger(__name__)
_plain_heads: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


@torch.no_grad()
def _head_applies_plainly(model: Any, model_input: dict[str, torch.Tensor]) -> bool:
    """Whether the model's logits are its head applied to its decoder's output, and nothing more.

    Some families scale or soft-cap the logits (Gemma 2's `final_logit_softcapping`, Granite's
    `logits_scaling`, Cohere's `logit_scale`), or do more between decoder and head; rather than
    know each, this is checked once per model, on the first two positions of a real batch.
    """
    known = _plain_heads.get(model)
    if known is not None:
        return known
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    plain = decoder is not model and head is not None
    if plain:
        sample = {k: v[:1, :2] for k, v in model_input.items()}
        was_training = model.training
        model.eval()
        try:
            expected = model(**sample).logits.float()
            got = head(decoder(**sample).last_hidden_state).float()
        finally:
            model.train(was_training)
        plain = torch.equal(got, expected)  # the same products in the same order: equal to the bit
    if not plain:
        log.debug("fused head loss steps aside for %s: its logits are not lm_head(decoder(x))", type(model).__name__)
    _plain_heads[model] = plain
    return plain


def exact_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of logits of any dtype, in fp32 (log-sum-exp minus the target's logit)."""
    exact = logits.float()
    return (torch.logsumexp(exact, dim=-1) - exact.gather(1, targets[:, None])[:, 0]).sum()


class _FusedHeadCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, targets)) for a frozen `weight`; grads to `hidden` only.

    Per block of rows: one softmax kernel in the weight's dtype (it accumulates in fp32) gives the
    gradient (softmax - one_hot) and, through log p(target), the loss; rows whose target
    probability is too small for that dtype get their loss from an exact fp32 log-sum-exp.
    Without a gradient to compute (evaluation), the loss comes from an fp32 log-sum-exp.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        want_grad = hidden.requires_grad
        n = hidden.shape[0]
        budget = (BLOCK_ELEMENTS if want_grad else FP32_BLOCK_ELEMENTS) // weight.shape[0]
        most_rows = max(_ROW_MULTIPLE, budget // _ROW_MULTIPLE * _ROW_MULTIPLE)
        rows = round_up(math.ceil(n / math.ceil(n / most_rows)), _ROW_MULTIPLE)  # equal blocks
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = hidden.new_empty((round_up(n, rows), hidden.shape[1]), dtype=weight.dtype) if want_grad else None
        # One buffer for every block's logits, turned into probabilities in place: fresh 16 MiB
        # tensors each block would cost a page fault per 4 KiB and push the weight out of cache.
        logits = hidden.new_empty((rows, weight.shape[0]), dtype=weight.dtype)
        block = hidden.new_zeros((rows, hidden.shape[1]), dtype=weight.dtype)
        index = torch.arange(rows, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, rows):
                real = min(rows, n - start)
                block[:real] = hidden[start : start + real]
                block[real:] = 0
                target = targets[start : start + real]
                torch.mm(block, weight.t(), out=logits)
                if grad is None:
                    total += exact_cross_entropy_sum(logits[:real], target)
                    continue
                probs = torch.softmax(logits, dim=-1, out=logits)
                target_probs = probs[index[:real], target].float()
                tiny = target_probs < _TINY_PROBABILITY
                total -= torch.where(tiny, 1.0, target_probs).log().sum()
                if bool(tiny.any()):  # the logits are gone: recompute those few rows
                    total += exact_cross_entropy_sum(block[:real][tiny] @ weight.t(), target[tiny])
                probs[index[:real], target] -= 1  # d loss / d logits = softmax - one_hot
                torch.mm(probs, weight, out=grad[start : start + rows])
        ctx.save_for_backward(grad[:n] if grad is not None else None)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        # A 0-d float32 factor scales in float32 (1 / tokens rounded to bf16 would be 0.2% off)
        return (grad * grad_output).to(ctx.hidden_dtype), None, None


def _fusable_head(head: Any) -> bool:
    return type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad


def head_cross_entropy(head: Any, hidden: torch.Tensor, targets: torch.Tensor, fast: bool = True) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` against `targets`; fused for a frozen linear head."""
    if fast and _fusable_head(head) and hidden.shape[0] > 0:
        return _FusedHeadCrossEntropy.apply(hidden, head.weight, targets)
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def labelled_outputs(model: Any, batch: dict[str, torch.Tensor],
                     fast: bool = True) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """(rows, head, targets) at the labelled positions of a collated batch.

    `rows` are the final hidden states and `head` the output layer to apply to them, or, for a
    model whose logits are more than `head(hidden)` (or with `fast` off), the logits themselves
    and `head` None.
    """
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if fast and _head_applies_plainly(base, inputs):
        hidden = base.get_decoder()(**inputs).last_hidden_state
        return hidden[:, :-1][mask], base.get_output_embeddings(), targets[mask]
    return model(**inputs).logits[:, :-1][mask], None, targets[mask]


def summed_token_loss(model: Any, batch: dict[str, torch.Tensor], fast: bool = True) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over labelled positions, number of those positions)."""
    rows, head, targets = labelled_outputs(model, batch, fast)
    if head is not None:
        return head_cross_entropy(head, rows, targets, fast), len(targets)
    return F.cross_entropy(rows.float(), targets, reduction="sum"), len(targets)
