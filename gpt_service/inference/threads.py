"""The engine's intra-op thread count, chosen from the decode steps it times."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


class ThreadTuner:
    """Chooses the engine's intra-op thread count from the decode steps it times, again and again.

    More threads shorten a step's matrix products when the cores are free, but each product waits
    for its slowest thread: on a small machine where the HTTP event loop, the clients or another
    process keep a core busy, a two-thread step can take ten times as long as a one-thread one.
    So now and then a short trial runs pairs of steps of one batch, one step on a single thread and
    the next on all of them, and keeps all of them if they were faster in most of `pairs` pairs (a
    much slower step ends the trial at once). The next trial comes after `period` decode steps,
    twice as many (up to 16 times) each time a trial confirms the choice. OMP_NUM_THREADS, when
    set, fixes the count instead.
    """

    def __init__(self, most: int | None = None, period: int = 256, pairs: int = 5) -> None:
        self.most = most or torch.get_num_threads()
        self.tuning = self.most > 1 and not os.environ.get("OMP_NUM_THREADS")
        self.current = 1 if self.tuning else self.most
        self.base_period, self.period, self.pairs = period, period, pairs
        self._countdown = 0  # decode steps until the next trial
        self._wins: list[bool] = []  # per pair: were all threads faster?
        self._first: tuple[int, float] | None = None  # the pair's one-thread step: (rows, seconds)
        self._trial_steps = 0
        self._threads = self.current
        self._rows = 0
        self._in_trial = False

    def before_decode(self, rows: int) -> None:
        """Set the thread count for the coming decode step of `rows` rows."""
        self._rows = rows
        self._in_trial = self.tuning and self._countdown <= 0
        if not self._in_trial:
            self._countdown -= 1
            threads = self.current
        else:  # a pair's second step runs on all threads, if the batch is still the same
            threads = self.most if self._first is not None and self._first[0] == rows else 1
        self._threads = threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def after_decode(self, seconds: float) -> None:
        if not self._in_trial:
            return
        self._trial_steps += 1
        much_slower = False
        if self._threads == 1:
            self._first = (self._rows, seconds)
        else:
            assert self._first is not None
            self._wins.append(seconds < self._first[1])
            much_slower = seconds > 1.5 * self._first[1]
            self._first = None
        if much_slower or len(self._wins) >= self.pairs or self._trial_steps >= 8 * self.pairs:
            if much_slower or len(self._wins) >= self.pairs:
                choice = self.most if not much_slower and sum(self._wins) * 2 > len(self._wins) else 1
                self.period = min(2 * self.period, 16 * self.base_period) if choice == self.current \
                    else self.base_period
                self.current = choice
                log.debug("decode steps on %d thread(s): %d of %d pairs were faster on %d", self.current,
                          sum(self._wins), len(self._wins), self.most)
            self._countdown, self._wins, self._first, self._trial_steps = self.period, [], None, 0
            if torch.get_num_threads() != self.current:
                torch.set_num_threads(self.current)
