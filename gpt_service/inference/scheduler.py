"""Which sequences run in the next step, and how many of their tokens: admission by memory, not by count.

As vLLM's v1 scheduler: every step has a token budget. Running sequences come first, in the order
they were admitted: each decoding one feeds its one new token, and one still prefilling feeds the
next chunk of its prompt that the budget allows (chunked prefill: a long prompt enters over
several steps while the others keep decoding). Waiting requests are admitted in arrival order
while rows, budget and free KV blocks allow, each taking the cached blocks of its prompt's
longest known prefix first. When a running sequence needs a block and none is free, the one
admitted last is preempted: its blocks go back and it waits at the front of the queue to be
computed again.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from gpt_service.inference.kv_cache import KVCacheManager
from gpt_service.inference.sequence import Sequence


@dataclass
class Step:
    """One step's work: each sequence with how many of its tokens it feeds, in running order."""

    work: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)  # dropped their cache this step
    rejected: list[Sequence] = field(default_factory=list)  # can never fit in the KV cache

    @property
    def decode_only(self) -> bool:
        return all(n == 1 and seq.computed > 0 for seq, n in self.work)


class Scheduler:
    """The waiting queue and the running sequences of one engine."""

    def __init__(self, kv: KVCacheManager, max_running: int, token_budget: int, chunked: bool = True) -> None:
        self.kv = kv
        self.max_running = max_running
        self.token_budget = max(token_budget, max_running)  # every running row can always decode
        self.chunked = chunked
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> Step:
        step = Step()
        decoding = sum(1 for seq in self.running if seq.remaining == 1)
        budget = full = self.token_budget - decoding  # for prompt chunks
        for seq in list(self.running):
            if seq not in self.running:  # preempted for an earlier one
                continue
            n = 1 if seq.remaining == 1 else self._chunk(seq.remaining, budget, budget < full)
            if n == 0:
                continue
            if not self._make_room(seq, n, step):
                break
            step.work.append((seq, n))
            budget -= n if seq.remaining > 1 else 0
        while self.waiting and not step.preempted and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if seq.done:
                self.waiting.popleft()
                continue
            if self.kv.blocks_for(len(seq.tokens)) > self.kv.num_blocks:
                step.rejected.append(self.waiting.popleft())
                continue
            prefix = self.kv.cached_prefix(seq.tokens, seq.adapter)
            computed = len(prefix) * self.kv.block_size
            n = self._chunk(len(seq.tokens) - computed, budget, budget < full)
            if n == 0 or not self.kv.can_take(prefix, seq.table, computed + n):
                break
            self.kv.take(prefix, seq.table, seq.tokens, seq.adapter)
            seq.computed = computed
            self.kv.grow(seq.table, computed + n)
            self.running.append(self.waiting.popleft())
            step.work.append((seq, n))
            budget -= n
        return step

    def advanced(self, step: Step) -> None:
        """The step ran: its tokens are computed, and their full blocks become findable."""
        for seq, n in step.work:
            seq.computed += n
            self.kv.register(seq.table, seq.tokens, seq.computed, seq.adapter)

    def finish(self, seq: Sequence) -> None:
        """A running sequence ended: its blocks go back (its full ones stay findable until reused)."""
        self.running.remove(seq)
        self.kv.free(seq.table)

    def preempt_all(self) -> list[Sequence]:
        """Every running sequence back to the queue's front, in order, to be computed again."""
        preempted = list(self.running)
        for seq in reversed(preempted):
            self._preempt(seq)
        return preempted

    def _chunk(self, remaining: int, budget: int, shared: bool) -> int:
        """How many of a prompt's `remaining` tokens go in this step: a chunk, or all of them unchunked.

        Unchunked, a prompt longer than the budget still goes when no other prompt has taken any of the
        budget (`shared`), so that no prompt waits forever.
        """
        if self.chunked:
            return max(0, min(remaining, budget))
        return remaining if remaining <= budget or not shared else 0

    def _make_room(self, seq: Sequence, n: int, step: Step) -> bool:
        """Grow `seq`'s blocks for `n` more tokens, preempting the sequences admitted last as needed.

        False when `seq` itself had to go (preempted, or rejected when even alone it does not fit).
        """
        while not self.kv.grow(seq.table, seq.computed + n):
            victim = self.running[-1]
            if victim is seq and len(self.running) == 1:
                self.finish(seq)
                step.rejected.append(seq)
                return False
            self._preempt(victim)
            step.preempted.append(victim)
            step.work = [(s, k) for s, k in step.work if s is not victim]
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq.table)
        seq.computed = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1
