"""The engine's intra-op thread count, chosen from the decode steps it times, per size of batch."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)
# The process's thread count before any tuner set it: a tuner made later (another model loaded) must not take
# the one thread an earlier engine's trial left behind for all there are.
CORES = torch.get_num_threads()


@dataclass
class _Choice:
    """The thread count for one size class of decode batches, and the state of its trials."""

    current: int
    period: int  # decode steps of this class between trials
    countdown: int = 0  # decode steps of this class until the next trial
    wins: list[bool] = field(default_factory=list)  # per pair: were all threads within the tolerance?
    first: tuple[int, float] | None = None  # the pair's one-thread step: (rows, seconds)
    trial_steps: int = 0


class ThreadTuner:
    """Chooses the engine's intra-op thread count from the decode steps it times, again and again.

    More threads shorten a step's matrix products when the cores are free, but each product waits
    for its slowest thread: on a small machine where the HTTP event loop, the clients or another
    process keep a core busy, a two-thread step can take ten times as long as a one-thread one.
    So now and then a short trial runs pairs of steps of one batch, one step on a single thread and
    the next on all of them, and keeps all of them unless they were slower by more than `tolerance`
    in most of `pairs` pairs (an all-thread step `much_slower` than its pair's ends the trial at
    once). Steps' times are noisy and a wrong single thread costs far more than a wrong two (at 4
    to 16 rows on free cores, a third of the throughput), hence the tolerance. The next trial comes
    after `period` decode steps, twice as many (up to 16 times) each time a trial confirms the choice.

    The answer depends on the batch: a one-row step has little to share out, a 16-row one much
    more. So each size class of batch (1, 2-3, 4-7, 8-15 rows, ...) has its own choice and its own
    trials, and a choice made while one client was served does not slow the 16 that come later.
    OMP_NUM_THREADS, when set, fixes the count instead.
    """

    def __init__(self, most: int | None = None, period: int = 256, pairs: int = 5, tolerance: float = 1.15,
                 much_slower: float = 3.0) -> None:
        self.most = most or CORES
        self.tuning = self.most > 1 and not os.environ.get("OMP_NUM_THREADS")
        self.base_period, self.pairs, self.tolerance, self.much_slower = period, pairs, tolerance, much_slower
        self._choices: dict[int, _Choice] = {}
        self._choice: _Choice | None = None  # the coming step's, while it is in a trial
        self._threads = self.most
        self._rows = 0

    def choice(self, rows: int) -> _Choice:
        """The choice for batches of `rows` rows (their size class: the bit length of `rows`)."""
        size_class = rows.bit_length()
        choice = self._choices.get(size_class)
        if choice is None:
            choice = self._choices[size_class] = _Choice(self.most, self.base_period)  # until a trial says otherwise
        return choice

    def before_prefill(self, rows: int) -> None:
        """Set the thread count for a coming step that feeds prompt tokens to some of its `rows` rows
        (not timed: its pairs would not be alike)."""
        threads = self.choice(rows).current
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def before_decode(self, rows: int) -> None:
        """Set the thread count for the coming decode step of `rows` rows."""
        choice = self.choice(rows)
        self._rows = rows
        self._choice = choice if self.tuning and choice.countdown <= 0 else None
        if self._choice is None:
            choice.countdown -= 1
            threads = choice.current
        else:  # a pair's second step runs on all threads, if the batch is still the same
            threads = self.most if choice.first is not None and choice.first[0] == rows else 1
        self._threads = threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def after_decode(self, seconds: float) -> None:
        choice = self._choice
        if choice is None:
            return
        choice.trial_steps += 1
        much_slower = False
        if self._threads == 1:
            choice.first = (self._rows, seconds)
        else:
            assert choice.first is not None
            choice.wins.append(seconds < self.tolerance * choice.first[1])
            much_slower = seconds > self.much_slower * choice.first[1]
            choice.first = None
        decided = much_slower or len(choice.wins) >= self.pairs
        if decided or choice.trial_steps >= 8 * self.pairs:
            if decided:
                threads = self.most if not much_slower and sum(choice.wins) * 2 > len(choice.wins) else 1
                choice.period = min(2 * choice.period, 16 * self.base_period) if threads == choice.current \
                    else self.base_period
                choice.current = threads
                log.debug("decode steps of %d-row batches on %d thread(s): %d of %d pairs were not slower on %d",
                          self._rows, threads, sum(choice.wins), len(choice.wins), self.most)
            choice.countdown, choice.wins, choice.first, choice.trial_steps = choice.period, [], None, 0
            self._choice = None
