"""The KV cache manager: blocks handed out and given back, prefixes shared, reused least recently freed first."""

from __future__ import annotations

from gpt_service.inference.kv_cache import BlockTable, KVCacheManager


def admit(kv: KVCacheManager, tokens: list[int], namespace: str = "base") -> tuple[BlockTable, int]:
    """A sequence's table after taking its cached prefix and blocks for all its tokens; the tokens found cached."""
    table = BlockTable()
    prefix = kv.cached_prefix(tokens, namespace)
    assert kv.can_take(prefix, table, len(tokens))
    kv.take(prefix, table, tokens, namespace)
    assert kv.grow(table, len(tokens))
    kv.register(table, tokens, len(tokens), namespace)
    return table, len(prefix) * kv.block_size


def test_blocks_are_handed_out_and_given_back() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4, prefix_caching=False)
    table = BlockTable()
    assert kv.grow(table, 9) and len(table.blocks) == 3 and kv.free_blocks == 1
    assert not kv.grow(BlockTable(), 8)  # two blocks wanted, one free: nothing taken
    assert kv.free_blocks == 1
    kv.free(table)
    assert kv.free_blocks == 4 and table.blocks == []


def test_an_identical_prefix_is_shared_not_recomputed() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    system = list(range(100, 108))  # two full blocks
    first, hit = admit(kv, [*system, 1, 2, 3])
    assert hit == 0
    second, hit = admit(kv, [*system, 7, 8])
    assert hit == 8 and second.blocks[:2] == first.blocks[:2] and second.blocks[2] != first.blocks[2]
    assert kv.stats.hit == 8 and kv.stats.queried == 21
    shared = first.blocks[:2]
    kv.free(first)
    kv.free(second)
    third, hit = admit(kv, [*system, 9])  # still cached after both ended
    assert hit == 8 and third.blocks[:2] == shared


def test_the_last_token_is_always_computed() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(8))
    kv.free(admit(kv, tokens)[0])
    assert admit(kv, tokens)[1] == 4  # the second block holds the last token: computed again for its logits


def test_adapters_never_share_blocks() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(9))
    admit(kv, tokens, "adapter_1")
    assert admit(kv, tokens, "adapter_2")[1] == 0
    assert admit(kv, tokens, "adapter_1")[1] == 8


def test_a_cached_prefix_gives_way_when_its_memory_is_needed() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=4)
    kv.free(admit(kv, list(range(9)))[0])
    assert kv.free_blocks == 3  # cached blocks count as free
    fresh = BlockTable()
    assert kv.grow(fresh, 12)  # takes all three, forgetting the cached prefix
    kv.free(fresh)
    assert admit(kv, list(range(9)))[1] == 0


def test_the_tail_blocks_are_reused_first() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2)
    table, _ = admit(kv, [1, 2, 3, 4, 5, 6, 7])  # blocks hold [1 2] [3 4] [5 6] [7]
    kv.free(table)
    taken = BlockTable()
    assert kv.grow(taken, 4)  # two blocks: [7]'s and the prefix's tail, [5 6]
    kv.free(taken)
    assert admit(kv, [1, 2, 3, 4, 5, 6, 7])[1] == 4  # [1 2] [3 4] survived


def test_a_shared_block_is_free_only_when_its_last_holder_leaves() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2)
    first, _ = admit(kv, [1, 2, 3])
    second, _ = admit(kv, [1, 2, 4])
    assert kv.free_blocks == 1  # [1 2] shared, [3] and [4] own
    kv.free(first)
    assert kv.free_blocks == 2
    kv.free(second)
    assert kv.free_blocks == 4
