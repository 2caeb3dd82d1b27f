"""The scheduler: a token budget per step, prompts in chunks, admission by free blocks, preemption."""

from __future__ import annotations

from typing import Any

from gpt_service.inference.kv_cache import KVCacheManager
from gpt_service.inference.sampling import SamplingParams
from gpt_service.inference.scheduler import Scheduler, Step
from gpt_service.inference.sequence import GenerationRequest, Sequence


class Bytes:
    """A tokenizer good enough for `TextAssembler`: one byte a token."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode(errors="replace")


def seq(length: int, first: int = 1) -> Sequence:
    return Sequence(GenerationRequest(list(range(first, first + length)), SamplingParams(), None, lambda e: None),
                    Bytes())


def run(scheduler: Scheduler) -> Step:
    """Schedule a step and pretend it ran: each sequence fed to its end gets one more token."""
    step = scheduler.schedule()
    scheduler.advanced(step)
    for s, _ in step.work:
        if s.remaining == 0:
            s.tokens.append(0)
    return step


def fed(step: Step) -> list[tuple[Any, int]]:
    return [(s.prompt_len, n) for s, n in step.work]


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_decode() -> None:
    scheduler = Scheduler(KVCacheManager(64, 4), max_running=8, token_budget=16)
    short, long = seq(3), seq(40, first=50)
    scheduler.add(short)
    run(scheduler)
    scheduler.add(long)
    assert fed(run(scheduler)) == [(3, 1), (40, 15)]  # the short one decodes; the long one takes the rest
    assert fed(run(scheduler)) == [(3, 1), (40, 15)]
    assert fed(run(scheduler)) == [(3, 1), (40, 10)]  # its last chunk: its first token comes next
    assert long.generated == 1
    assert fed(run(scheduler)) == [(3, 1), (40, 1)]


def test_unchunked_a_prompt_goes_whole_and_alone_past_the_budget() -> None:
    scheduler = Scheduler(KVCacheManager(64, 4), max_running=8, token_budget=16, chunked=False)
    for s in (seq(3), seq(40, first=50), seq(5, first=100)):
        scheduler.add(s)
    assert fed(run(scheduler)) == [(3, 3)]  # the 40-token prompt does not fit beside it
    assert fed(run(scheduler)) == [(3, 1), (40, 40)]
    assert fed(run(scheduler)) == [(3, 1), (40, 1), (5, 5)]


def test_admission_waits_for_free_blocks_not_for_a_row_count() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4, prefix_caching=False)
    scheduler = Scheduler(kv, max_running=8, token_budget=64)
    for s in (seq(7), seq(7, first=20), seq(7, first=40)):
        scheduler.add(s)
    assert fed(run(scheduler)) == [(7, 7), (7, 7)]  # two blocks each: the third waits
    assert len(scheduler.waiting) == 1


def test_the_last_admitted_is_preempted_and_later_computed_again() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4, prefix_caching=False)
    scheduler = Scheduler(kv, max_running=8, token_budget=64)
    first, second = seq(7), seq(8, first=20)
    scheduler.add(first)
    scheduler.add(second)
    run(scheduler)  # 2 + 2 blocks: the pool is full
    assert first.tokens[-1] == 0 and second.tokens[-1] == 0
    step = run(scheduler)  # the first needs its third block: the second gives all of its back
    assert step.preempted == [second] and fed(step) == [(7, 1)]
    assert second.computed == 0 and scheduler.waiting[0] is second and second.generated == 1
    assert scheduler.preemptions == 1
    scheduler.finish(first)
    assert fed(run(scheduler)) == [(8, 9)]  # prompt and answer computed again


def test_a_sequence_that_cannot_fit_even_alone_is_rejected() -> None:
    scheduler = Scheduler(KVCacheManager(num_blocks=2, block_size=4), max_running=8, token_budget=64)
    too_long, fits = seq(9), seq(4, first=20)
    scheduler.add(too_long)
    scheduler.add(fits)
    step = run(scheduler)
    assert step.rejected == [too_long] and fed(step) == [(4, 4)]
    for _ in range(5):  # 4 + 4 tokens fill both blocks; the ninth cannot fit
        step = run(scheduler)
    assert step.rejected == [fits] and not scheduler.running


def test_a_cached_prefix_is_not_fed_again() -> None:
    scheduler = Scheduler(KVCacheManager(num_blocks=16, block_size=4), max_running=8, token_budget=64)
    first = seq(10)
    scheduler.add(first)
    run(scheduler)
    scheduler.finish(first)
    again = seq(10)
    scheduler.add(again)
    assert fed(run(scheduler)) == [(10, 2)] and again.computed == 10


def test_rows_are_capped_and_cancelled_requests_never_start() -> None:
    scheduler = Scheduler(KVCacheManager(64, 4), max_running=2, token_budget=64)
    gone = seq(3)
    gone.request.cancelled.set()
    for s in (gone, seq(3, first=10), seq(3, first=20), seq(3, first=30)):
        scheduler.add(s)
    assert [s.prompt_len for s, _ in run(scheduler).work] == [3, 3] and len(scheduler.waiting) == 1
