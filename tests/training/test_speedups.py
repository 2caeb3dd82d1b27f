"""The recipe's hand-written speed-ups compute what the plain PyTorch / PEFT code they replace does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt_service.training.loss import head_cross_entropy
from gpt_service.training.recipe import _cpu_attention, _LoraDropout


def test_lora_dropout_drops_p_of_the_elements_and_scales_the_rest_like_inverted_dropout() -> None:
    torch.manual_seed(0)
    x = (torch.rand(400, 512) + 0.5).to(torch.bfloat16).requires_grad_()  # no zeros of its own
    dropout = _LoraDropout(0.1).train()
    out = dropout(x)
    kept = out != 0
    assert out.dtype == torch.bfloat16
    assert abs(1 - kept.float().mean().item() - 0.1) < 0.005
    scale = 1 / (1 - 0.1)
    assert torch.equal(out[kept], (x.detach() * scale)[kept])  # rounded once, as x * scale is
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, torch.where(kept, torch.tensor(scale, dtype=torch.bfloat16), 0).to(x.grad.dtype))
    again = dropout(x)
    assert not torch.equal(again != 0, kept)  # a fresh mask each call
    assert dropout.eval()(x) is x
    assert _LoraDropout(0.0).train()(x) is x


@pytest.mark.parametrize("rows", [5, 700])  # one block, and several (blocks of 512 rows at this vocabulary)
def test_fused_head_cross_entropy_matches_cross_entropy_and_its_gradient(rows: int) -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 32768, bias=False).requires_grad_(False)
    hidden = torch.randn(rows, 64, requires_grad=True)
    targets = torch.randint(0, 32768, (rows,))
    loss = head_cross_entropy(head, hidden, targets)
    loss.backward()
    reference_hidden = hidden.detach().clone().requires_grad_()
    reference = F.cross_entropy(head(reference_hidden), targets, reduction="sum")
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(hidden.grad, reference_hidden.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # the evaluation path: fp32 log-sum-exp
        assert head_cross_entropy(head, hidden, targets).item() == pytest.approx(reference.item(), rel=1e-5)


def _reference_attention(query, key, value, keep):  # [b, h, L, d] x2, [b, kv, L, d], bool [b, 1, L, L]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5
    scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    return (scores.softmax(-1) @ value).transpose(1, 2)


def test_cpu_attention_matches_plain_grouped_query_attention_with_padding_and_causal_masks() -> None:
    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 7, 8
    query = torch.randn(batch, heads, length, dim)
    key, value = torch.randn(batch, kv_heads, length, dim), torch.randn(batch, kv_heads, length, dim)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    padded = torch.ones(batch, length, dtype=torch.bool)
    padded[1, :2] = False  # the second row is left-padded by two
    keep = causal[None, None] & padded[:, None, None, :]
    module = torch.nn.Module()
    out, _ = _cpu_attention(module, query, key, value, keep, scaling=dim**-0.5)
    expected = _reference_attention(query, key, value, keep)
    torch.testing.assert_close(out[0], expected[0])
    torch.testing.assert_close(out[1, 2:], expected[1, 2:])  # the padding positions' own outputs are unused
    out, _ = _cpu_attention(module, query, key, value, None, scaling=dim**-0.5)  # None: plainly causal
    plainly_causal = causal[None, None].expand(batch, 1, -1, -1)
    torch.testing.assert_close(out, _reference_attention(query, key, value, plainly_causal))
