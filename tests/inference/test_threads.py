"""The thread tuner keeps all threads only when the timed pairs of decode steps say they are faster."""

from __future__ import annotations

import pytest
import torch

from gpt_service.inference.threads import ThreadTuner


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def trial(tuner: ThreadTuner, one: float, many: float) -> None:
    """A whole trial of pairs: each one-thread step takes `one` seconds, each all-thread step `many`."""
    for _ in range(tuner.pairs):
        tuner.before_decode(8)
        tuner.after_decode(one if torch.get_num_threads() == 1 else many)
        tuner.before_decode(8)
        tuner.after_decode(one if torch.get_num_threads() == 1 else many)


def test_all_threads_are_kept_when_faster_and_dropped_when_slower() -> None:
    tuner = ThreadTuner(most=2, period=4, pairs=3)
    assert tuner.current == 1
    trial(tuner, one=0.010, many=0.008)
    assert tuner.current == 2 and torch.get_num_threads() == 2
    for _ in range(tuner.period):  # no trial until the period is over
        tuner.before_decode(8)
        tuner.after_decode(1.0)
    tuner.before_decode(8)
    tuner.after_decode(0.010)  # the next trial's one-thread step
    tuner.before_decode(8)
    tuner.after_decode(0.020)  # all threads much slower: the trial ends at once
    assert tuner.current == 1 and torch.get_num_threads() == 1


def test_a_set_thread_count_is_not_tuned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    tuner = ThreadTuner(most=2)
    assert not tuner.tuning and tuner.current == 2
