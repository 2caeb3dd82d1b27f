"""Attention through block tables equals plain causal attention over each sequence's own keys and values,
through the gathered views and through the attention kernel alike."""

from __future__ import annotations

import pytest
import torch

from gpt_service.inference import cpu_kernels
from gpt_service.inference.kv_cache import BlockTable
from gpt_service.inference.paged import KVPool, PagedBatch, attend
from gpt_service.inference.sampling import SamplingParams
from gpt_service.inference.sequence import GenerationRequest, Sequence

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 8, 4


def sequence(length: int, computed: int, blocks: list[int]) -> Sequence:
    seq = Sequence(GenerationRequest(list(range(length)), SamplingParams(), None, lambda e: None), tokenizer=None)
    seq.computed, seq.table = computed, BlockTable(blocks)
    return seq


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int) -> torch.Tensor:
    """Causal attention of the queries at positions first.. over keys and values 0..: [n, heads * head_dim]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [context, heads, head_dim]
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[2] ** 0.5
    future = torch.arange(k.shape[0])[None, :] > torch.arange(first, first + q.shape[0])[:, None]
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", weights, v).reshape(q.shape[0], -1)


def attend_and_check(work: list[tuple[Sequence, int]], num_blocks: int, kernel: bool = False,
                     heads: int = HEADS, kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM, block: int = BLOCK,
                     dtype: torch.dtype = torch.float32) -> PagedBatch:
    """Cache each sequence's earlier keys and values at its blocks, run one step of `work` through the pool,
    and check every token's output against plain causal attention (float32) over its own sequence."""
    pool = KVPool(1, num_blocks=num_blocks, block_size=block, kv_heads=kv_heads, head_dim=head_dim,
                  dtype=dtype, device=torch.device("cpu"))
    keys = {id(s): torch.randn(s.computed + n, kv_heads, head_dim).to(dtype) for s, n in work}
    values = {id(s): torch.randn(s.computed + n, kv_heads, head_dim).to(dtype) for s, n in work}
    for s, _ in work:  # what earlier steps cached
        slots = torch.tensor([s.table.blocks[p // block] * block + p % block for p in range(s.computed)])
        pool.write(0, slots, keys[id(s)][:s.computed], values[id(s)][:s.computed])
    batch = PagedBatch.of(work, block, torch.device("cpu"), kernel)
    pool.write(0, batch.slots, torch.cat([keys[id(s)][s.computed:] for s, _ in work]),
               torch.cat([values[id(s)][s.computed:] for s, _ in work]))
    q = torch.randn(batch.ids.numel(), heads, head_dim).to(dtype)
    out = attend(q, pool.keys[0], pool.values[0], batch, head_dim ** -0.5)
    start = 0
    for s, n in work:
        expected = reference(q[start:start + n].float(), keys[id(s)].float(), values[id(s)].float(), s.computed)
        # bf16: the output's own rounding (2^-8 relative) and that of the gathered path's scores and weights
        torch.testing.assert_close(out[start:start + n].float(), expected,
                                   **{} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2})
        start += n
    return batch


@pytest.fixture(params=[False, True], ids=["gathered", "kernel"])
def kernel(request: pytest.FixtureRequest) -> bool:
    """Decode attention through gathered views, or through the attention kernel (built here; CI has a compiler)."""
    if request.param:
        assert cpu_kernels.available(), "the attention kernel did not build: see the warning logged"
    return request.param


def test_decode_rows_and_a_prompt_chunk_attend_to_their_own_blocks(kernel: bool) -> None:
    torch.manual_seed(0)
    # two decoding sequences (10 and 3 tokens cached, one more fed) and one fed a 5-token chunk after 6 cached,
    # their blocks scattered over the pool
    work = [(sequence(11, 10, [7, 2, 12]), 1), (sequence(4, 3, [5]), 1), (sequence(11, 6, [9, 0, 14]), 5)]
    batch = attend_and_check(work, num_blocks=16, kernel=kernel)
    assert batch.last.tolist() == [0, 1, 6]  # every sequence fed to its end: its last token's logits
    assert batch.positions.tolist() == [10, 3, 6, 7, 8, 9, 10]
    assert [sorted(group.rows.tolist()) for group in batch.decodes] == [[0, 1]]  # short rows: one padded group


def test_short_decode_rows_are_not_padded_to_a_long_one() -> None:
    """Eight 3-token rows and one of 1,000 tokens: the long one attends in a group of its own."""
    torch.manual_seed(0)
    blocks = iter(range(300))
    short = [(sequence(4, 3, [next(blocks)]), 1) for _ in range(8)]
    long = (sequence(1001, 1000, [next(blocks) for _ in range(251)]), 1)
    batch = attend_and_check([short[0], long, *short[1:]], num_blocks=300)
    assert sorted(group.rows.tolist() for group in batch.decodes) == [[0, 2, 3, 4, 5, 6, 7, 8], [1]]
    assert {tuple(group.tables.shape) for group in batch.decodes} == {(8, 1), (1, 251)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 2, 64), (7, 1, 128), (6, 6, 40)])
def test_the_kernel_reads_rows_of_any_length_through_their_tables(heads: int, kv_heads: int, head_dim: int,
                                                                  dtype: torch.dtype) -> None:
    """Grouped queries (4 and 7 per kv head, and none), the head sizes it specializes (64, 128) and another (40),
    rows of 1 to 300 tokens ending anywhere in a block, blocks shuffled over the pool, in one group."""
    assert cpu_kernels.available()
    torch.manual_seed(0)
    blocks = iter(torch.randperm(400).tolist())
    work = []
    for length in (1, 16, 17, 45, 300, 129):
        work.append((sequence(length + 1, length, [next(blocks) for _ in range(-(-(length + 1) // 16))]), 1))
    batch = attend_and_check(work, num_blocks=400, kernel=True, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                             block=16, dtype=dtype)
    assert len(batch.decodes) == 1 and batch.decodes[0].mask is None
    assert batch.decodes[0].lengths.tolist() == [2, 17, 18, 46, 301, 130]
