"""The model's forward for the architectures we know (Llama, Qwen2, Mistral), over the paged KV cache.

The model's own forward spends much of a small step on generic machinery (mask building, module
dispatch, one sub-batch per adapter in PEFT's mixed-adapter forward, weights re-laid out for every
product). `FastDecoder.forward` does the same maths with the model's own norms, rotary embedding
and weights, for one step's tokens side by side: prompt chunks and decode tokens of many
sequences, each token with its own adapter, the projections in `Group`s. Keys and values are
written into the block pool at each token's slot and read back through each sequence's block
table (see `PagedAttention`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from gpt_service.inference import cpu_kernels
from gpt_service.inference.paged import KVPool, PagedBatch, attend
from gpt_service.memory import free_memory

log = logging.getLogger(__name__)


@dataclass
class AdapterRows:
    """Which rows (tokens) of a step use which adapter, as the LoRA products of `Group` need it."""

    present: tuple[int, ...]  # the adapters used (indices into the groups' stacks), in increasing order
    gather: torch.Tensor  # the rows of each present adapter in turn, each padded to `width` rows
    width: int
    slots: torch.Tensor | None  # the real (not padding) rows among the gathered ones; None: all are real
    rows: torch.Tensor  # the batch row of each real slot

    @classmethod
    def of(cls, index: list[int], device: torch.device) -> AdapterRows | None:
        by_adapter: dict[int, list[int]] = {}
        for row, adapter in enumerate(index):
            if adapter:
                by_adapter.setdefault(adapter, []).append(row)
        if not by_adapter:
            return None
        present = tuple(sorted(by_adapter))
        width = max(len(rows) for rows in by_adapter.values())
        gather, slots, real = [], [], []
        for j, adapter in enumerate(present):
            rows = by_adapter[adapter]
            gather += rows + [rows[0]] * (width - len(rows))
            slots += range(j * width, j * width + len(rows))
            real += rows
        padded = len(slots) != len(gather)
        return cls(present, torch.tensor(gather, device=device), width,
                   torch.tensor(slots, device=device) if padded else None, torch.tensor(real, device=device))


class Group:
    """Linear layers of the decoder that read the same input (q, k and v; gate and up; or one alone).

    On CPU in bf16, their weights are laid out once, side by side, in oneDNN's blocked format: the
    group is one matrix product, bit for bit the products of its members, without the weights being
    re-laid out at every call (the output layer of a one-row step takes a third of the time).

    LoRA: each adapter's A matrices of all members side by side, and its B matrices in blocks, make
    one low-rank pair per adapter, stacked over adapters. A step gathers each adapter's rows (padded
    to the largest group), multiplies them by their own adapter's pair in two batched products, and
    adds the result to those rows: every adapter used costs its own rows' work, not the batch's.
    """

    def __init__(self, modules: list[Any], adapter_index: dict[str, int]) -> None:
        bases = [getattr(m, "base_layer", m) for m in modules]
        self.weights: list[torch.Tensor] = [b.weight for b in bases]
        self.biases: list[torch.Tensor | None] = [b.bias for b in bases]
        self.sizes = [w.shape[0] for w in self.weights]
        self.packed: torch.Tensor | None = None
        self.packed_bias: torch.Tensor | None = None
        self.lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # A [adapters + 1, in, rank],
        # B [adapters + 1, rank, outputs], scaling [adapters + 1, 1, rank]; adapter 0 (none) is zero
        self._subsets: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        blocks: dict[int, list[tuple[int, torch.Tensor, torch.Tensor, float]]] = {}
        for i, module in enumerate(modules):
            for name, adapter in adapter_index.items():
                if name in getattr(module, "lora_A", {}):
                    blocks.setdefault(adapter, []).append(
                        (i, module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]))
        if not blocks:
            return
        dtypes = {t.dtype for parts in blocks.values() for _, a, b, _ in parts for t in (a, b)}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        device = next(iter(blocks.values()))[0][1].device
        rank = max(sum(a.shape[0] for _, a, _, _ in parts) for parts in blocks.values())
        starts = [sum(self.sizes[:i]) for i in range(len(self.sizes) + 1)]
        count = len(adapter_index) + 1
        a_all = torch.zeros(count, self.weights[0].shape[1], rank, dtype=dtype, device=device)
        b_all = torch.zeros(count, rank, starts[-1], dtype=dtype, device=device)
        s_all = torch.zeros(count, 1, rank, dtype=dtype, device=device)
        for adapter, parts in blocks.items():
            column = 0
            for i, a, b, scaling in parts:
                r = a.shape[0]
                a_all[adapter, :, column:column + r] = a.detach().t()
                b_all[adapter, column:column + r, starts[i]:starts[i + 1]] = b.detach().t()
                s_all[adapter, 0, column:column + r] = scaling
                column += r
        self.lora = (a_all, b_all, s_all)

    def pack(self, previous: dict[tuple[int, ...], Group]) -> None:
        """Lay the weights out for oneDNN, or take the copy a previous decoder made of these very weights."""
        old = previous.get(tuple(id(w) for w in self.weights))
        if old is not None and all(a is b for a, b in zip(old.weights, self.weights, strict=True)):
            self.packed, self.packed_bias = old.packed, old.packed_bias
            return
        weight = self.weights[0] if len(self.weights) == 1 else torch.cat(self.weights, 0)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)
        if any(b is not None for b in self.biases):
            self.packed_bias = torch.cat([b.detach() if b is not None else torch.zeros(
                size, dtype=weight.dtype) for b, size in zip(self.biases, self.sizes, strict=True)])

    def stacks(self, adapters: AdapterRows | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The LoRA A, B and scaling stacks of the adapters these rows use (None: no LoRA here, or no adapter
        used); kept for the last few sets of adapters."""
        if adapters is None or self.lora is None:
            return None
        stacks = self._subsets.get(adapters.present)
        if stacks is None:
            keep = torch.tensor(adapters.present, device=self.lora[0].device)
            stacks = tuple(t[keep] for t in self.lora)  # type: ignore[assignment]
            if len(self._subsets) >= 8:
                self._subsets.clear()
            self._subsets[adapters.present] = stacks  # type: ignore[assignment]
        return stacks

    def __call__(self, x: torch.Tensor, adapters: AdapterRows | None) -> torch.Tensor:
        """The members' outputs side by side: [rows, sum of their sizes]."""
        if self.packed is not None:
            out = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.packed_bias, "none", [], "")
        elif len(self.weights) == 1:
            out = torch.nn.functional.linear(x, self.weights[0], self.biases[0])
        else:
            out = torch.cat([torch.nn.functional.linear(x, w, b) for w, b in zip(self.weights, self.biases,
                                                                                   strict=True)], -1)
        stacks = self.stacks(adapters)
        if stacks is None:
            return out
        assert adapters is not None
        a, b, scaling = stacks
        rows = x.index_select(0, adapters.gather).to(a.dtype).view(len(adapters.present), adapters.width, -1)
        delta = torch.bmm(torch.bmm(rows, a) * scaling, b).view(-1, out.shape[1])
        if adapters.slots is not None:
            delta = delta.index_select(0, adapters.slots)
        return out.index_add_(0, adapters.rows, delta.to(out.dtype))


class FastDecoder:
    """The forward of a Llama-style model over the paged KV cache, its LoRA rows batched per adapter.

    Anything it does not know (another architecture, sliding windows, a LoRA variant such as DoRA,
    adapters on other modules) is left to the model's own forward (see `model_runner`). The
    weights' blocked copies (see `Group`) are made when they fit in a quarter of the free memory.
    """

    ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM")
    ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
    MLP = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, model: Any, previous: FastDecoder | None = None) -> None:
        self.model = model
        lm = model.get_base_model() if hasattr(model, "peft_config") else model
        names = list(getattr(model, "peft_config", {}))
        self.adapter_index = {name: i + 1 for i, name in enumerate(names)}
        inner = lm.model
        self.embed, self.rotary, self.norm = inner.embed_tokens, inner.rotary_emb, inner.norm
        self.lm_head = Group([lm.lm_head], {})
        self.layers: list[tuple[Any, Group, Group, Group, Group]] = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((layer, Group([attn.q_proj, attn.k_proj, attn.v_proj], self.adapter_index),
                                Group([attn.o_proj], self.adapter_index),
                                Group([mlp.gate_proj, mlp.up_proj], self.adapter_index),
                                Group([mlp.down_proj], self.adapter_index)))
        groups = self.groups()
        weights = [w for g in groups for w in g.weights]
        if torch.backends.mkldnn.is_available() and all(
                w.device.type == "cpu" and w.dtype == torch.bfloat16 for w in weights) and sum(
                w.numel() * w.element_size() for w in weights) * 4 <= free_memory():
            done = {tuple(id(w) for w in g.weights): g for g in previous.groups()} if previous else {}
            try:
                for group in groups:
                    group.pack(done)
            except (RuntimeError, AttributeError):  # a torch without these oneDNN ops: plain products
                for group in groups:
                    group.packed = group.packed_bias = None
        self.in_one_call = self._in_one_call(lm.config)

    def _in_one_call(self, config: Any) -> tuple[list[Any], list[Any], list[torch.Tensor], list[float]] | None:
        """The operands of `cpu_kernels.decode_layers` (every layer's products, biases, norms and epsilons),
        or None where it cannot run this model: products not laid out for oneDNN, or another activation."""
        groups = [g for _, *layer_groups in self.layers for g in layer_groups]
        if any(g.packed is None for g in groups) or getattr(config, "hidden_act", None) not in ("silu", "swish") or \
                len({layer.self_attn.scaling for layer, *_ in self.layers}) != 1:
            return None
        norms = [n for layer, *_ in self.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        return ([g.packed for g in groups], [g.packed_bias for g in groups], [n.weight for n in norms],
                [float(n.variance_epsilon) for n in norms])

    def groups(self) -> list[Group]:
        return [self.lm_head] + [g for _, *layer_groups in self.layers for g in layer_groups]

    @classmethod
    def for_model(cls, model: Any, previous: FastDecoder | None = None) -> FastDecoder | None:
        """The fast step for this model, or None (with a debug line saying why) where its own forward must run."""
        reason = cls.unsupported(model)
        if reason is not None:
            log.debug("fast decode step steps aside: %s", reason)
            return None
        return cls(model, previous)

    @classmethod
    def unsupported(cls, model: Any) -> str | None:
        """Why the fast step cannot run this model, or None when it can."""
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        lm = model.get_base_model() if hasattr(model, "peft_config") else model
        if type(lm).__name__ not in cls.ARCHITECTURES:
            return f"{type(lm).__name__} is not one of {', '.join(cls.ARCHITECTURES)}"
        if lm.training:
            return "the model is in training mode"
        if getattr(lm, "is_quantized", False):
            return "a quantized base (its bitsandbytes layers run through the model's own forward)"
        layer_types = getattr(lm.config, "layer_types", None)
        window = getattr(lm.config, "sliding_window", None)
        if any(kind != "full_attention" for kind in layer_types or ()) or (
                layer_types is None and window is not None and window < lm.config.max_position_embeddings):
            return "layers other than full attention (sliding windows)"
        inner = getattr(lm, "model", None)
        if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "rotary_emb", "norm", "layers")):
            return "no embed_tokens, rotary_emb, norm and layers"
        norms = [inner.norm] + [n for layer in inner.layers for n in (
            getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))]
        if not all(hasattr(n, "weight") and hasattr(n, "variance_epsilon") for n in norms):
            return "norms other than RMSNorm (weight, variance_epsilon)"
        allowed = set()
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if not all(hasattr(attn, a) for a in (*cls.ATTENTION, "scaling", "head_dim")) or not all(
                    hasattr(mlp, a) for a in (*cls.MLP, "act_fn")):
                return "attention or MLP modules of another layout"
            for module in [getattr(attn, n) for n in cls.ATTENTION] + [getattr(mlp, n) for n in cls.MLP]:
                if isinstance(module, BaseTunerLayer):
                    if type(module) is not LoraLinear or module.merged or module.disable_adapters:
                        return f"{type(module).__name__} adapter layer (merged, disabled or not LoRA)"
                    if getattr(module, "fan_in_fan_out", False) or getattr(module, "lora_variant", None) or any(
                            getattr(module, "use_dora", {}).values()) or any(
                            getattr(module, "lora_bias", {}).values()) or getattr(module, "lora_embedding_A", None):
                        return "a LoRA variant (DoRA, LoRA bias, fan-in-fan-out)"
                    if not isinstance(module.base_layer, torch.nn.Linear):
                        return f"a LoRA layer over {type(module.base_layer).__name__}"
                    allowed.add(id(module))
                elif not isinstance(module, torch.nn.Linear):
                    return f"a projection of type {type(module).__name__}"
        for module in lm.modules():
            if isinstance(module, AuxiliaryTrainingWrapper) or (
                    isinstance(module, BaseTunerLayer) and id(module) not in allowed):
                return "adapters on modules other than the attention and MLP projections"
        if not isinstance(lm.lm_head, torch.nn.Linear):
            return f"an output head of type {type(lm.lm_head).__name__}"
        return None

    def pool(self, num_blocks: int, block_size: int) -> KVPool:
        """A block pool shaped for this model's keys and values."""
        attn = self.layers[0][0].self_attn
        weight = self.lm_head.weights[0]
        kv_heads = self.layers[0][1].sizes[1] // attn.head_dim
        return KVPool(len(self.layers), num_blocks, block_size, kv_heads, attn.head_dim, weight.dtype, weight.device)

    def forward(self, batch: PagedBatch, pool: KVPool) -> torch.Tensor:
        """Float32 logits [len(batch.last), vocab] at `batch.last`; writes every token's keys and values into `pool`."""
        ids, positions, fused = batch.ids, batch.positions, batch.kernels
        rows = AdapterRows.of([self.adapter_index.get(a, 0) for a in batch.adapters], ids.device)
        hidden = self.embed(ids)  # [tokens, hidden]
        cos, sin = self.rotary(hidden, positions[:, None])  # [tokens, 1, head_dim], broadcast over heads
        if fused and not batch.chunks and self.in_one_call is not None:
            (decode,) = batch.decodes  # with the kernels, the decoding rows attend in one group
            attn, qkv = self.layers[0][0].self_attn, self.layers[0][1]
            stacks = [g.stacks(rows) for _, *layer_groups in self.layers for g in layer_groups]
            lora = (*([None if s is None else s[i] for s in stacks] for i in range(3)),
                    *((rows.gather, rows.slots, rows.rows, rows.width) if rows else (None, None, None, 0)))
            hidden = cpu_kernels.decode_layers(
                hidden, *self.in_one_call, cos, sin, pool.keys, pool.values, batch.slots, decode.tables,
                decode.lengths, attn.scaling, qkv.sizes[0] // attn.head_dim, qkv.sizes[1] // attn.head_dim, *lora)
        else:
            hidden = self._layers(hidden, cos, sin, rows, batch, pool)
        return self.lm_head(_norm(hidden.index_select(0, batch.last), self.norm, fused), None).float().cpu()

    def _layers(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: AdapterRows | None,
                batch: PagedBatch, pool: KVPool) -> torch.Tensor:
        """The decoder layers, operator by operator: `hidden` after the last one."""
        fused = batch.kernels
        x = _norm(hidden, self.layers[0][0].input_layernorm, fused)
        for i, (layer, qkv, o_proj, gate_up, down) in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = _rotated(qkv(x, rows), qkv.sizes, attn.head_dim, cos, sin, fused)
            pool.write(i, batch.slots, k, v)
            attended = o_proj(attend(q, pool.keys[i], pool.values[i], batch, attn.scaling), rows)
            hidden, x = _add_norm(hidden, attended, layer.post_attention_layernorm, fused)
            gate, up = gate_up(x, rows).split(gate_up.sizes, -1)
            mlp = down(layer.mlp.act_fn(gate) * up, rows)
            if i + 1 < len(self.layers):
                hidden, x = _add_norm(hidden, mlp, self.layers[i + 1][0].input_layernorm, fused)
            else:
                hidden = hidden + mlp
        return hidden


def _norm(x: torch.Tensor, norm: torch.nn.Module, fused: bool) -> torch.Tensor:
    return cpu_kernels.rms_norm(x, norm) if fused else norm(x)


def _add_norm(hidden: torch.Tensor, residual: torch.Tensor, norm: torch.nn.Module,
              fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden + residual (in place where fused), and its norm."""
    if fused:
        return hidden, cpu_kernels.add_rms_norm_(hidden, residual, norm)
    hidden = hidden + residual
    return hidden, norm(hidden)


def _rotated(qkv: torch.Tensor, sizes: list[int], head_dim: int, cos: torch.Tensor, sin: torch.Tensor,
             fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The queries, keys and values ([tokens, heads, head_dim] each) of the q, k and v products side by side,
    the queries and keys rotated (the rotary embedding)."""
    n = qkv.shape[0]
    if fused:  # the queries and keys are side by side: one pass over both
        cpu_kernels.rotary_(qkv[:, :sizes[0] + sizes[1]].view(n, -1, head_dim), cos.reshape(n, -1), sin.reshape(n, -1))
    q, k, v = (part.view(n, -1, head_dim) for part in qkv.split(sizes, -1))
    if not fused:
        half = head_dim // 2
        q = q * cos + torch.cat((-q[..., half:], q[..., :half]), -1) * sin
        k = k * cos + torch.cat((-k[..., half:], k[..., :half]), -1) * sin
    return q, k, v
