"""The paged KV cache's tensors, one step's tokens laid out over them, and attention through block tables.

The pool holds, per layer, keys and values of `num_blocks` blocks of `block_size` tokens. A step's
new keys and values are written at their tokens' slots (block * block_size + offset) in place:
nothing else in the pool moves, so sequences join and leave without touching each other's memory.

Attention reads each sequence's blocks through its block table. On CPU the decoding sequences (one new
token each) attend through `cpu_kernels`, which reads their blocks in place. Elsewhere, or where
it could not be built, they are gathered into padded batch views, [kv_heads, rows, longest context, head_dim], for
two batched products per view: one view for rows of similar length, more where padding short rows
to a long one would cost more than another view's operations (`_by_context`). The pool is laid out
heads first ([kv_heads, blocks, block_size, head_dim] per layer) so that one `index_select` of whole
blocks gives a view already contiguous: measured on CPU (bf16, one thread, 64 rows of 30 to 170
tokens, tcmalloc), 0.86 ms a layer against 3.6 ms for advanced indexing of a blocks-first pool and a
strided product, the same numbers bit for bit. A loop over rows would pay PyTorch's per-call
overhead once per row and layer. A prompt chunk attends alone, causally, to its own sequence's
blocks, through PyTorch's fused attention (a 1,000-token prefill took 2 s of eager attention in bf16
on one thread).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from gpt_service.inference import cpu_kernels
from gpt_service.inference.sequence import Sequence


class KVPool:
    """Keys and values of every layer: [kv_heads, num_blocks, block_size, head_dim] each, allocated once."""

    def __init__(self, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (kv_heads, num_blocks, block_size, head_dim)
        self.block_size = block_size
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store a step's keys and values ([tokens, kv_heads, head_dim]) at their slots."""
        self.keys[layer].view(keys.shape[1], -1, keys.shape[2]).index_copy_(1, slots, keys.transpose(0, 1))
        self.values[layer].view(values.shape[1], -1, values.shape[2]).index_copy_(1, slots, values.transpose(0, 1))


@dataclass
class Chunk:
    """A run of one sequence's tokens fed in one step (a prompt chunk), and the blocks it attends to."""

    start: int  # its first token's index among the step's tokens
    length: int
    position: int  # its first token's position in the sequence
    blocks: torch.Tensor  # the sequence's blocks that hold positions [0, position + length)


@dataclass
class DecodeGroup:
    """Decoding sequences of similar context length, attended together over one padded batch view."""

    rows: torch.Tensor  # indices of their tokens among the step's tokens
    tables: torch.Tensor  # [rows, most blocks]: their block tables, padded
    lengths: torch.Tensor  # [rows]: their context lengths
    mask: torch.Tensor | None  # [1, rows, 1, most blocks * block_size]: 0, or the lowest float past each context;
    # None where the attention kernel reads the blocks in place (see `cpu_kernels`)


@dataclass
class PagedBatch:
    """One step's tokens, flattened: what the forward needs to embed, write and attend."""

    ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]
    adapters: list[str]  # per token
    slots: torch.Tensor  # [tokens]: where each token's keys and values go
    decodes: list[DecodeGroup]  # the tokens fed alone (decoding sequences)
    chunks: list[Chunk]
    last: torch.Tensor  # indices of the tokens whose logits are wanted (each sequence fed to its end)
    kernels: bool  # the step runs the CPU kernels (`cpu_kernels`): decode attention, norms, rotary embedding

    @classmethod
    def of(cls, work: list[tuple[Sequence, int]], block_size: int, device: torch.device,
           kernels: bool = False) -> PagedBatch:
        """The step's batch; `kernels`: it runs the CPU kernels, its decoding sequences attending in one group
        (else in padded views, grouped by context length)."""
        ids: list[int] = []
        positions: list[int] = []
        adapters: list[str] = []
        slots: list[int] = []
        singles: list[tuple[int, list[int], int]] = []  # token index, blocks, context length
        chunks: list[Chunk] = []
        last: list[int] = []
        for seq, n in work:
            start, first = len(ids), seq.computed
            ids += seq.tokens[first:first + n]
            positions += range(first, first + n)
            adapters += [seq.adapter] * n
            blocks = seq.table.blocks
            slots += [blocks[p // block_size] * block_size + p % block_size for p in range(first, first + n)]
            used = -(-(first + n) // block_size)
            if n == 1:
                singles.append((start, blocks[:used], first + 1))
            else:
                chunks.append(Chunk(start, n, first, torch.tensor(blocks[:used], device=device)))
            if first + n == len(seq.tokens):
                last.append(start + n - 1)

        groups = ([singles] if singles else []) if kernels else _by_context(singles, block_size)
        decodes = [_decode_group(group, block_size, device, masked=not kernels) for group in groups]
        return cls(_longs(ids, device), _longs(positions, device), adapters, _longs(slots, device), decodes, chunks,
                   _longs(last, device), kernels)


# One more decode group costs about as much as this many more padded tokens of context in a group: its
# eight more operations against the gather and the products per token. Measured on CPU (bf16, one
# thread, 64-wide heads, one layer): the mixed workload's 16 decoding rows, 100 to 1,300 tokens, took
# 1.8 ms in one group, 0.85-0.9 ms in the two or three groups this gives at any value from 1,024 to
# 4,096, and 1.7-2 ms in one group per distinct length; 16 and 64 rows of 30 to 300 tokens took the
# same as in one group, within noise.
_GROUP_COST_TOKENS = 2048


def _by_context(singles: list[tuple[int, list[int], int]], block_size: int) -> list[list[tuple[int, list[int], int]]]:
    """The decoding sequences split into groups of similar length, so that short ones are not padded to
    the longest: the split, over the sequences sorted by blocks used, that costs least in padded blocks
    plus `_GROUP_COST_TOKENS` per group (dynamic programming over the distinct block counts)."""
    if not singles:
        return []
    singles = sorted(singles, key=lambda single: len(single[1]))
    widths = sorted({len(blocks) for _, blocks, _ in singles})
    upto = [sum(len(blocks) <= width for _, blocks, _ in singles) for width in widths]  # rows at most this wide
    group_cost = _GROUP_COST_TOKENS / block_size
    best = [0.0] + [float("inf")] * len(widths)  # best[j]: cost of the rows up to widths[j - 1]
    cut = [0] * (len(widths) + 1)
    for j in range(1, len(widths) + 1):
        for i in range(j):
            cost = best[i] + (upto[j - 1] - (upto[i - 1] if i else 0)) * widths[j - 1] + group_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    ends, j = [], len(widths)
    while j:
        ends.append(upto[j - 1])
        j = cut[j]
    return [singles[a:b] for a, b in itertools.pairwise([0, *ends[::-1]])]


def _decode_group(singles: list[tuple[int, list[int], int]], block_size: int, device: torch.device,
                  masked: bool) -> DecodeGroup:
    width = max(len(blocks) for _, blocks, _ in singles)
    lengths = _longs([length for _, _, length in singles], device)
    mask = None
    if masked:
        mask = torch.zeros(len(singles), width * block_size, device=device)
        mask.masked_fill_(torch.arange(width * block_size, device=device)[None, :] >= lengths[:, None],
                          torch.finfo(torch.float32).min)
        mask = mask[None, :, None, :]
    tables = _longs([blocks + [0] * (width - len(blocks)) for _, blocks, _ in singles], device)
    return DecodeGroup(_longs([start for start, _, _ in singles], device), tables, lengths, mask)


def _longs(values: list[Any], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: PagedBatch,
           scaling: float) -> torch.Tensor:
    """Each token's attention output, [tokens, heads * head_dim], over its sequence's cached keys and values.

    q: [tokens, heads, head_dim]; keys, values: one layer's pool, [kv_heads, blocks, block_size, head_dim].
    Scores and softmax in float32, as the models' eager attention computes them.
    """
    tokens, heads, head_dim = q.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads  # the query heads that share each kv head, side by side
    out = q.new_empty(tokens, heads, head_dim)
    for decode in batch.decodes:
        if decode.mask is None:
            out[decode.rows] = cpu_kernels.decode(q.index_select(0, decode.rows), keys, values, decode.tables,
                                                       decode.lengths, scaling)
            continue
        rows = decode.rows.numel()
        blocks = decode.tables.flatten()
        k = _blocks(keys, blocks).view(kv_heads, rows, -1, head_dim)  # [kv_heads, rows, context, head_dim]
        v = _blocks(values, blocks).view(kv_heads, rows, -1, head_dim)
        grouped = q.index_select(0, decode.rows).view(rows, kv_heads, group, head_dim).transpose(0, 1)
        scores = torch.matmul(grouped, k.transpose(-1, -2)).float() * scaling + decode.mask
        attended = torch.matmul(scores.softmax(-1).to(v.dtype), v)  # [kv_heads, rows, group, head_dim]
        out[decode.rows] = attended.transpose(0, 1).reshape(rows, heads, head_dim)
    for chunk in batch.chunks:  # PyTorch's fused attention: on CPU a flash kernel, far faster than the above
        context = chunk.position + chunk.length
        k = _blocks(keys, chunk.blocks)[:, :context]  # [kv_heads, context, head_dim]
        v = _blocks(values, chunk.blocks)[:, :context]
        grouped = q[chunk.start:chunk.start + chunk.length].transpose(0, 1)  # [heads, length, head_dim]
        seen = torch.arange(context, device=q.device)[None, :] <= torch.arange(
            chunk.position, context, device=q.device)[:, None]
        out[chunk.start:chunk.start + chunk.length] = torch.nn.functional.scaled_dot_product_attention(
            grouped[None], k[None], v[None], attn_mask=None if chunk.position == 0 else seen,
            is_causal=chunk.position == 0, scale=scaling, enable_gqa=True)[0].transpose(0, 1)
    return out.view(tokens, heads * head_dim)


def _blocks(pool: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """These blocks of one layer's pool, side by side: [kv_heads, blocks * block_size, head_dim], contiguous."""
    kv_heads, _, _, head_dim = pool.shape
    return pool.view(kv_heads, pool.shape[1], -1).index_select(1, blocks).view(kv_heads, -1, head_dim)
