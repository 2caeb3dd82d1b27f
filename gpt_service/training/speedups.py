"""Hand-written fast paths for LoRA training that leave the result a standard PEFT LoRA.

`speed_up(model, precision)` installs them on a PEFT model: the LoRA branch as one autograd
function (`_LoraDelta`), and on a CPU a LoRA dropout from 16-bit random draws shared by the
layers that read one input, and batched-matmul attention. Each is tested against the plain
PyTorch / PEFT code it replaces (tests/training/test_speedups.py).
"""

from __future__ import annotations

import logging
import threading
import types
import weakref
from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from gpt_service.hardware import Precision

log = logging.getLogger(__name__)

CPU_ATTENTION = "gpt_service_cpu"
# Batched-matmul attention keeps its (batch x heads x length^2) scores for the backward; above this
# many per layer, PyTorch's flash kernel (which does not) is used instead.
MATMUL_ATTENTION_MAX_SCORES = 1 << 25


class _GroupedMask(threading.local):
    """The additive mask in the grouped-query layout, built once per forward pass for all layers.

    Per thread, so that runs in two threads of one process cannot hand each other their masks.
    """

    def __init__(self) -> None:
        self.source: torch.Tensor | None = None
        self.layout: tuple[Any, ...] | None = None
        self.mask: torch.Tensor | None = None

    def get(self, source: torch.Tensor | None, batch: int, kv_heads: int, groups: int, length: int,
            dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        layout = (batch, kv_heads, groups, length, dtype, device)
        if self.mask is not None and self.source is source and self.layout == layout:
            return self.mask
        mask = source
        if mask is None:  # SDPA's mask is None when it would be the plain causal one
            mask = torch.ones(1, 1, length, length, dtype=torch.bool, device=device).tril()
        if mask.dtype == torch.bool:
            additive = torch.zeros(mask.shape, dtype=dtype, device=device)
            additive.masked_fill_(~mask, torch.finfo(dtype).min)
        else:
            additive = mask.to(dtype)
        self.mask = (additive[:, :, None].expand(batch, kv_heads, groups, length, length)
                     .reshape(batch * kv_heads, groups * length, length))
        self.source, self.layout = source, layout
        return self.mask

    def clear(self) -> None:
        self.source = self.layout = self.mask = None


_grouped_mask = _GroupedMask()


def cpu_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                   **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention for CPU training: two batched matmuls when the scores fit, SDPA (same masks) otherwise.

    The query heads that share a key/value head are stacked into one matrix, so keys and values
    are never repeated, and the scale and the mask ride along in one `baddbmm`: two to four times
    faster than PyTorch's CPU flash kernel, forward plus backward, at a few hundred positions.
    """
    batch, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    if (query.device.type != "cpu" or dropout or key.shape[2] != length or heads % kv_heads
            or batch * heads * length * length > MATMUL_ATTENTION_MAX_SCORES
            or (attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1
                                                or attention_mask.shape[-2:] != (length, length)))
            or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    groups = heads // kv_heads
    mask = _grouped_mask.get(attention_mask, batch, kv_heads, groups, length, query.dtype, query.device)
    q = query.reshape(batch * kv_heads, groups * length, head_dim)
    k = key.reshape(batch * kv_heads, length, head_dim)
    v = value.reshape(batch * kv_heads, length, head_dim)
    scores = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=head_dim**-0.5 if scaling is None else scaling)
    probs = torch.softmax(scores, dim=-1)  # accumulates in fp32 whatever the dtype
    out = torch.bmm(probs, v).view(batch, heads, length, head_dim)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(CPU_ATTENTION, cpu_attention)
AttentionMaskInterface.register(CPU_ATTENTION, sdpa_mask)


class _ScaleWhereKept(torch.autograd.Function):
    """x * keep * scale for a 0/1 `keep` of x's dtype, one pass each way, rounded once as `x * scale` is.

    Autograd's `torch.where(keep, x * scale, 0)` takes two passes forward and two backward.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.addcmul(x.new_zeros(()), x, keep, value=scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return torch.addcmul(grad.new_zeros(()), grad, keep, value=ctx.scale), None, None


class LoraDropout(nn.Module):
    """Inverted dropout from 16-bit random draws (p rounded to a multiple of 2^-16), one mask per input.

    `nn.Dropout` draws one random float per element; four 16-bit draws from each 64-bit integer
    are a quarter of that work, which on a CPU is most of what the LoRA dropout costs.

    One instance serves the LoRA layers of one parent module: called again with the very tensor it
    dropped last (q, k and v read the same normed hidden states, and so do gate and up), it
    returns the same dropped tensor. Those layers then share one mask, as PEFT's do in models with
    a fused projection (GPT-2's `c_attn`, Phi-3's `qkv_proj`), and two of every three draws are
    saved. It holds both tensors only weakly, so the sharing lasts while the first layer keeps
    the dropped tensor for its backward, which `_LoraDelta` does. Under activation checkpointing
    each layer gets an instance of its own: the checkpointed forward keeps no dropped tensor to
    share, and the recompute must draw exactly the masks that forward drew.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        dropped = round(p * 65536)
        self.keep_from = dropped - 32768  # a draw (a signed 16-bit integer) below this drops its element
        self.scale = 1 / (1 - dropped / 65536)
        self._last: tuple[weakref.ref, int, weakref.ref] | None = None  # input, its version, output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.keep_from == -32768:
            return x
        if self._last is not None:
            last_input, version, last_output = self._last
            out = last_output()
            if last_input() is x and version == x._version and out is not None:
                return out
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        draws = words.view(torch.int16)[:n].view(x.shape)
        keep = torch.ge(draws, self.keep_from, out=torch.empty_like(x))
        out = _ScaleWhereKept.apply(x, keep, self.scale)
        self._last = (weakref.ref(x), x._version, weakref.ref(out))
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _LoraDelta(torch.autograd.Function):
    """`result + scale * (dropped @ A.T) @ B.T`, PEFT's LoRA branch, as one matmul-add each way.

    Autograd's `result + lora_B(lora_A(dropped)) * scaling` spends a pass each way on the scaling
    and one on the sum, and takes A's gradient as `dropped.T @ grad_h`, whose tall-and-thin output
    a CPU computes 3x slower than the same numbers as `grad_h.T @ dropped`. Here the scaling rides
    in the matmuls, and both weight gradients come from (rank x tokens) @ (tokens x features):
    0.25-0.3 ms less per LoRA layer, forward and backward, at 460 tokens (of 0.65-0.9 ms that
    PEFT's LoRA adds to the layer there).
    """

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, dropped: torch.Tensor, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float) -> torch.Tensor:
        dtype = result.dtype  # the compute dtype: autocast's, or the weights' without it
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        inputs = dropped.reshape(-1, dropped.shape[-1]).to(dtype)
        hidden = inputs @ a.t()
        out = torch.addmm(result.reshape(-1, result.shape[-1]), hidden, b.t(), alpha=scale)
        ctx.save_for_backward(inputs, hidden, a, b)
        ctx.scale, ctx.dropped_dtype, ctx.dropped_shape = scale, dropped.dtype, dropped.shape
        ctx.weight_dtypes = lora_a.dtype, lora_b.dtype
        return out.view(result.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                                                         torch.Tensor | None, None]:
        inputs, hidden, a, b = ctx.saved_tensors
        a_dtype, b_dtype = ctx.weight_dtypes
        grad_out = grad.reshape(-1, grad.shape[-1])
        grad_hidden = grad_out @ (b * ctx.scale)
        _, wants_dropped, wants_a, wants_b, _ = ctx.needs_input_grad
        grad_dropped = (grad_hidden @ a).to(ctx.dropped_dtype).view(ctx.dropped_shape) if wants_dropped else None
        grad_a = torch.mm(grad_hidden.t(), inputs).to(a_dtype) if wants_a else None
        grad_b = torch.mm(hidden.t(), grad_out).t().to(b_dtype).mul_(ctx.scale) if wants_b else None
        return grad, grad_dropped, grad_a, grad_b, None


def _lean_layer_types() -> tuple[type, ...]:
    """PEFT's LoRA layers whose branch `_LoraDelta` computes: over a plain linear layer, or a 4- or
    8-bit one of bitsandbytes (their forwards differ only in casts that `_LoraDelta` makes too)."""
    try:
        from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt
    except ImportError:  # no bitsandbytes
        return (LoraLinear,)
    return LoraLinear, Linear4bit, Linear8bitLt


def _lean_lora_forward(layer: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT's LoRA forward through `_LoraDelta` in the case training is: one plain adapter, unmerged."""
    adapters = layer.active_adapters
    adapter = adapters[0] if len(adapters) == 1 else None
    if (args or kwargs or not layer.training or layer.disable_adapters or layer.merged or adapter is None
            or adapter not in layer.lora_A or adapter in layer.lora_variant
            or layer.lora_B[adapter].bias is not None):
        return type(layer).forward(layer, x, *args, **kwargs)
    return _LoraDelta.apply(layer.base_layer(x), layer.lora_dropout[adapter](x),
                            layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, layer.scaling[adapter])


def speed_up(model: Any, precision: Precision, checkpointing: bool = False) -> None:
    """Make the PEFT model train faster without changing what it saves or (dropout masks aside) computes.

    `checkpointing`: the model will recompute its activations in the backward pass (see `LoraDropout`).
    """
    shared_dropouts: dict[tuple[str, str, float], LoraDropout] = {}
    lean_types = _lean_layer_types()
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if type(module) in lean_types:
            module.forward = types.MethodType(_lean_lora_forward, module)
        else:
            log.debug("lean LoRA branch steps aside for %s: a %s", name, type(module).__name__)
        if precision.autocast_dtype is not None:
            # PEFT casts each LoRA input to the (fp32) LoRA weights' dtype, and autocast casts it
            # straight back for the matmul: two copies of every activation, for nothing.
            module.cast_input_dtype_enabled = False
        if precision.device.type == "cpu":  # CUDA's fused dropout kernel is fast already
            sharers = name if checkpointing else name.rpartition(".")[0]  # the layer alone, or its parent's
            for adapter, dropout in module.lora_dropout.items():
                if type(dropout) is nn.Dropout and dropout.p > 0:
                    key = (sharers, adapter, dropout.p)
                    if key not in shared_dropouts:
                        shared_dropouts[key] = LoraDropout(dropout.p)
                    module.lora_dropout[adapter] = shared_dropouts[key]
    if precision.device.type != "cpu":
        log.debug("shared LoRA dropout steps aside: %s's own dropout kernel is fused", precision.device.type)
    base = model.get_base_model()
    attention = base.config._attn_implementation
    if precision.device.type != "cpu" or attention != "sdpa":
        log.debug("CPU attention steps aside: %s attention on %s", attention, precision.device.type)
        return
    try:
        base.set_attn_implementation(CPU_ATTENTION)
    except (ValueError, NotImplementedError) as exc:  # a model without the attention interface
        log.debug("CPU attention steps aside, keeping sdpa: %s", exc)


def clear_caches() -> None:
    """Drop this thread's cached attention mask (a training-sized mask need not outlive the run)."""
    _grouped_mask.clear()
