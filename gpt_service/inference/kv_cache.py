"""The KV cache's bookkeeping: fixed-size blocks from one pool, each sequence's block table, prefix reuse.

As in vLLM's v1 KV cache manager: a sequence owns the blocks that hold its tokens' keys and values,
in order (its block table). A full block of prompt or answer tokens gets a content hash chained to
its predecessor's (and the adapter's name, so different adapters never share), and stays findable
by that hash after its sequence ends, until its memory is needed again: a later request whose
tokens begin with the same full blocks takes them instead of computing them (automatic prefix
caching). Free blocks are handed out least recently freed first, so the prefixes used last stay
longest. Blocks are shared by reference count and never written once full, so sharing is safe.

This module holds no tensors: the model runner keeps the pool's keys and values, indexed by block id.
"""

from __future__ import annotations

import array
import collections
import hashlib
import math
from collections.abc import Sequence as Tokens
from dataclasses import dataclass, field


@dataclass
class BlockTable:
    """One sequence's blocks, and the hashes of those that are full."""

    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # of blocks[:len(hashes)], each full and registered


@dataclass
class PrefixStats:
    """Prompt tokens looked up in the prefix cache, and those found there."""

    queried: int = 0
    hit: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit / self.queried if self.queried else 0.0


def block_hash(parent: bytes, namespace: str, tokens: Tokens[int]) -> bytes:
    """A full block's identity: its tokens, its predecessor's hash and the namespace (the adapter).

    SHA-256, not Python's hash: token ids are chosen by users, and a crafted collision would let one
    request read another's cached keys and values.
    """
    return hashlib.sha256(parent + namespace.encode() + b"\0" + array.array("q", tokens).tobytes()).digest()


class KVCacheManager:
    """Allocates the pool's blocks to sequences, shares identical prefixes, and counts what is free."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV cache needs at least one block of at least one token ({num_blocks=}, "
                             f"{block_size=})")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self._refs = [0] * num_blocks
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}  # hash -> block holding it
        self._hash_of: dict[int, bytes] = {}  # block -> its hash, while it is findable
        self.stats = PrefixStats()

    @property
    def free_blocks(self) -> int:
        """Blocks no sequence holds (some may still hold a cached prefix, given up when needed)."""
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def cached_prefix(self, tokens: Tokens[int], namespace: str) -> list[int]:
        """The cached blocks that hold the longest prefix of `tokens`, leaving at least its last token to compute.

        Takes nothing (see `take`).
        """
        if not self.prefix_caching:
            return []
        found: list[int] = []
        parent = b""
        for start in range(0, len(tokens) - 1 - (len(tokens) - 1) % self.block_size, self.block_size):
            parent = block_hash(parent, namespace, tokens[start:start + self.block_size])
            block = self._cached.get(parent)
            if block is None:
                break
            found.append(block)
        return found

    def can_take(self, prefix: list[int], table: BlockTable, tokens: int) -> bool:
        """Whether `table`, given the cached `prefix` blocks, can grow to hold `tokens` tokens."""
        new = self.blocks_for(tokens) - len(table.blocks) - len(prefix)
        reused_free = sum(1 for block in prefix if self._refs[block] == 0)
        return new + reused_free <= len(self._free)

    def take(self, prefix: list[int], table: BlockTable, tokens: Tokens[int], namespace: str) -> None:
        """Give an empty table the cached `prefix` blocks (shared, not copied) of `tokens`; count the lookup."""
        assert not table.blocks
        if self.prefix_caching:
            self.stats.queried += len(tokens)
            self.stats.hit += len(prefix) * self.block_size
        parent = b""
        for i, block in enumerate(prefix):
            self._hold(block)
            parent = block_hash(parent, namespace, tokens[i * self.block_size:(i + 1) * self.block_size])
            table.blocks.append(block)
            table.hashes.append(parent)

    def grow(self, table: BlockTable, tokens: int) -> bool:
        """Add fresh blocks until the table holds `tokens` tokens; False (and nothing added) if too few are free."""
        needed = self.blocks_for(tokens) - len(table.blocks)
        if needed > len(self._free):
            return False
        for _ in range(needed):
            block, _ = self._free.popitem(last=False)
            self._forget(block)
            self._refs[block] = 1
            table.blocks.append(block)
        return True

    def register(self, table: BlockTable, tokens: Tokens[int], computed: int, namespace: str) -> None:
        """Make the table's full blocks of computed tokens findable by later sequences."""
        if not self.prefix_caching:
            return
        full = computed // self.block_size
        parent = table.hashes[-1] if table.hashes else b""
        for i in range(len(table.hashes), full):
            parent = block_hash(parent, namespace, tokens[i * self.block_size:(i + 1) * self.block_size])
            table.hashes.append(parent)
            block = table.blocks[i]
            if parent not in self._cached:  # else an identical block computed at the same time is findable already
                self._cached[parent] = block
                self._hash_of[block] = parent

    def free(self, table: BlockTable) -> None:
        """Give the table's blocks back, its last block first: a prefix's first blocks are the last reused."""
        for block in reversed(table.blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
        table.blocks.clear()
        table.hashes.clear()

    def reset_prefixes(self) -> None:
        """Forget every cached prefix (the weights they were computed with changed)."""
        self._cached.clear()
        self._hash_of.clear()

    def _hold(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._free[block]
        self._refs[block] += 1

    def _forget(self, block: int) -> None:
        digest = self._hash_of.pop(block, None)
        if digest is not None and self._cached.get(digest) == block:
            del self._cached[digest]
