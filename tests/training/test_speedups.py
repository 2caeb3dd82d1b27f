"""The recipe's hand-written speed-ups compute what the plain PyTorch / PEFT code they replace does."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

from gpt_service.hardware import Precision
from gpt_service.training.loss import head_cross_entropy
from gpt_service.training.speedups import LoraDropout, cpu_attention, speed_up


def test_lora_dropout_drops_p_of_the_elements_and_scales_the_rest_like_inverted_dropout() -> None:
    torch.manual_seed(0)
    x = (torch.rand(400, 512) + 0.5).to(torch.bfloat16).requires_grad_()  # no zeros of its own
    dropout = LoraDropout(0.1).train()
    out = dropout(x)
    kept = out != 0
    assert out.dtype == torch.bfloat16
    assert abs(1 - kept.float().mean().item() - 0.1) < 0.005
    scale = 1 / (1 - 0.1)
    assert torch.equal(out[kept], (x.detach() * scale)[kept])  # rounded once, as x * scale is
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, torch.where(kept, torch.tensor(scale, dtype=torch.bfloat16), 0).to(x.grad.dtype))
    assert dropout(x) is out  # the same input (q, k and v read one tensor): the same mask
    other = dropout(x.detach().clone())
    assert not torch.equal(other != 0, kept)  # another input: a fresh mask
    with torch.no_grad():
        x.add_(1)
    assert not torch.equal(dropout(x) != 0, kept)  # the same tensor changed in place: a fresh mask too
    assert dropout.eval()(x) is x
    assert LoraDropout(0.0).train()(x) is x


CPU_BF16 = Precision(torch.device("cpu"), torch.bfloat16, torch.bfloat16, grad_scaler=False)  # the recipe's
CPU_FP32 = Precision(torch.device("cpu"), torch.float32, None, grad_scaler=False)
EVERY_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_model(tiny_model, precision: Precision, **lora: Any) -> Any:
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=precision.weights_dtype)
    model = get_peft_model(base, LoraConfig(**lora))
    for param in model.parameters():
        if param.requires_grad:  # LoRA weights in fp32, as the recipe keeps them
            param.data = param.data.float()
    return model


def test_lora_layers_reading_one_tensor_share_a_dropout_mask_and_no_others_do(tiny_model) -> None:
    model = _lora_model(tiny_model, CPU_BF16, r=4, lora_dropout=0.1, target_modules=EVERY_LINEAR)
    speed_up(model, CPU_BF16)
    layers = model.get_base_model().model.layers
    attention = [getattr(layers[0].self_attn, name).lora_dropout["default"] for name in EVERY_LINEAR[:4]]
    mlp = [getattr(layers[0].mlp, name).lora_dropout["default"] for name in EVERY_LINEAR[4:]]
    assert all(type(d) is LoraDropout for d in attention + mlp)
    assert attention.count(attention[0]) == 4 and mlp.count(mlp[0]) == 3 and mlp[0] is not attention[0]
    assert layers[1].self_attn.q_proj.lora_dropout["default"] is not attention[0]
    ids = torch.randint(0, 100, (2, 9))
    with profile(activities=[ProfilerActivity.CPU]) as trace, torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()(ids).logits.sum().backward()
    draws = sum(event.count for event in trace.key_averages() if event.key == "aten::random_")
    assert draws == 4 * len(layers)  # q+k+v, o, gate+up, down: one mask each


@pytest.mark.parametrize("precision", [CPU_FP32, CPU_BF16], ids=["fp32", "bf16-autocast"])
def test_the_lean_lora_forward_computes_what_peft_does_and_the_same_gradients(tiny_model, precision) -> None:
    model = _lora_model(tiny_model, precision, r=4, lora_alpha=24, lora_dropout=0.1,  # scaling 6
                        target_modules=["q_proj"])  # q_proj has a bias
    speed_up(model.train(), precision)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.forward.__func__ is not type(layer).forward  # the lean path is installed
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # PEFT starts B at zero, which would hide B's part
    x = torch.randn(2, 5, layer.in_features, dtype=precision.weights_dtype)
    lora = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]

    def run(forward: Any) -> tuple[torch.Tensor, ...]:
        torch.manual_seed(0)  # the same dropout mask for both
        inputs = x.clone().requires_grad_()
        for weight in lora:
            weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.autocast_dtype is not None):
            out = forward(inputs)
        (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out, inputs.grad, *(weight.grad for weight in lora)

    tolerance = {"rtol": 1e-5, "atol": 1e-5} if precision is CPU_FP32 else {"rtol": 2e-2, "atol": 5e-2}
    for got, expected in zip(run(layer), run(lambda inputs: type(layer).forward(layer, inputs)), strict=True):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, **tolerance)


@pytest.mark.parametrize("rows", [5, 700])  # one block, and three (of at most 256 rows at this vocabulary)
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


def test_fused_head_cross_entropy_is_exact_where_bf16_probabilities_underflow() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 32768, bias=False).requires_grad_(False).to(torch.bfloat16)
    hidden = torch.randn(300, 64, dtype=torch.bfloat16)
    hidden[7] *= 400  # logits hundreds apart: most of this row's probabilities are 0 in any dtype
    targets = torch.randint(0, 32768, (300,))
    targets[7] = head(hidden[7]).argmin()
    loss = head_cross_entropy(head, hidden.requires_grad_(), targets)
    reference = F.cross_entropy(head(hidden.detach()).float(), targets, reduction="sum")
    assert reference.item() > 1000  # the underflowing row dominates, so a wrong value for it would show
    assert loss.item() == pytest.approx(reference.item(), rel=1e-3)


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
    out, _ = cpu_attention(module, query, key, value, keep, scaling=dim**-0.5)
    expected = _reference_attention(query, key, value, keep)
    torch.testing.assert_close(out[0], expected[0])
    torch.testing.assert_close(out[1, 2:], expected[1, 2:])  # the padding positions' own outputs are unused
    out, _ = cpu_attention(module, query, key, value, None, scaling=dim**-0.5)  # None: plainly causal
    plainly_causal = causal[None, None].expand(batch, 1, -1, -1)
    torch.testing.assert_close(out, _reference_attention(query, key, value, plainly_causal))
