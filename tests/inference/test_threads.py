"""The thread tuner keeps all threads only when the timed pairs of decode steps say they are faster."""

from __future__ import annotations

import pytest
import torch

from gpt_service.inference import threads
from gpt_service.inference.threads import ThreadTuner


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def trial(tuner: ThreadTuner, one: float, many: float, rows: int = 8) -> None:
    """A whole trial of pairs: each one-thread step takes `one` seconds, each all-thread step `many`."""
    for _ in range(tuner.pairs):
        for _ in range(2):
            tuner.before_decode(rows)
            tuner.after_decode(one if torch.get_num_threads() == 1 else many)


def test_all_threads_are_kept_when_faster_and_dropped_when_slower() -> None:
    tuner = ThreadTuner(most=2, period=4, pairs=3)
    choice = tuner.choice(8)
    assert choice.current == 2  # all threads until a trial says otherwise
    tuner.before_prefill(8)
    assert torch.get_num_threads() == 2
    trial(tuner, one=0.010, many=0.008)
    assert choice.current == 2
    tuner.before_decode(8)
    assert torch.get_num_threads() == 2
    tuner.after_decode(1.0)
    for _ in range(choice.period - 1):  # no trial until the period is over
        tuner.before_decode(8)
        tuner.after_decode(1.0)
    tuner.before_decode(8)
    tuner.after_decode(0.010)  # the next trial's one-thread step
    tuner.before_decode(8)
    tuner.after_decode(0.040)  # all threads much slower: the trial ends at once
    assert choice.current == 1
    tuner.before_decode(8)
    assert torch.get_num_threads() == 1


def test_all_threads_stay_when_only_a_little_slower() -> None:
    """Steps' times are noisy, and one thread where two were better costs far more than the reverse."""
    tuner = ThreadTuner(most=2, period=0, pairs=3, tolerance=1.15)  # a trial at every step
    trial(tuner, one=0.010, many=0.011)
    assert tuner.choice(8).current == 2
    trial(tuner, one=0.010, many=0.012)
    assert tuner.choice(8).current == 1


def test_each_size_of_batch_has_its_own_choice() -> None:
    """One thread wins for lone rows, all of them for 16 rows; neither choice moves the other."""
    tuner = ThreadTuner(most=2, period=1000, pairs=3)
    trial(tuner, one=0.010, many=0.012, rows=1)
    trial(tuner, one=0.020, many=0.012, rows=16)
    assert tuner.choice(1).current == 1 and tuner.choice(16).current == 2
    assert tuner.choice(31) is tuner.choice(16) and tuner.choice(32) is not tuner.choice(16)
    for rows, count in ((16, 2), (1, 1), (20, 2)):
        tuner.before_decode(rows)
        assert torch.get_num_threads() == count
        tuner.after_decode(0.01)
    tuner.before_prefill(16)  # a step with prompt tokens takes the choice of its size, untimed
    assert torch.get_num_threads() == 2


def test_a_tuner_made_later_is_not_held_to_the_one_thread_an_earlier_one_left() -> None:
    """A second engine (another model loaded) after the first one's one-thread step: it still tunes over all cores."""
    torch.set_num_threads(1)
    assert ThreadTuner().most == threads.CORES  # the process's count at import (2 on the CI's machines)


def test_a_set_thread_count_is_not_tuned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    tuner = ThreadTuner(most=2)
    assert not tuner.tuning and tuner.choice(8).current == 2
