"""The tokenized-data cache: a second preparation encodes nothing; anything that changes the tokens misses."""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpt_service.config import build_train_config
from gpt_service.data import cache
from gpt_service.data.prepare import PreparedData, prepare_data
from gpt_service.model_loading import load_tokenizer
from tests.conftest import write_json, write_jsonl
from tests.data.test_examples import CHAT


class Counted:
    """Counts the calls that encode text or render chats, on a tokenizer or on its Rust backend."""

    ENCODING = ("encode", "encode_batch", "encode_batch_fast")

    def __init__(self, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.tokenizer = tokenizer
        cls = type(tokenizer)
        for name in ("__call__", "encode", "apply_chat_template"):
            monkeypatch.setattr(cls, name, self._counting(getattr(cls, name)))
        monkeypatch.setattr(cls, "backend_tokenizer", property(lambda tok: self._Backend(tok._tokenizer, self)))

    def _counting(self, method: Callable) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return method(*args, **kwargs)
        return counted

    class _Backend:
        def __init__(self, backend: Any, counter: Counted) -> None:
            self.backend, self.counter = backend, counter

        def __getattr__(self, name: str) -> Any:
            value = getattr(self.backend, name)
            return self.counter._counting(value) if name in Counted.ENCODING else value


@pytest.fixture
def cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("GPT_SERVICE_DATA_CACHE", str(folder))
    monkeypatch.chdir(tmp_path)  # no config/models.yaml here, so the defaults apply
    return folder


@pytest.fixture
def tokenizer(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Counted:
    return Counted(load_tokenizer(str(tiny_model)), monkeypatch)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", [CHAT, *({"text": f"sample number {i}"} for i in range(19))])


def prepare(tiny_model: Path, tokenizer: Counted, dataset: Path, **overrides: Any) -> tuple[PreparedData, int]:
    """The prepared data and how many texts or chats the tokenizer was asked to handle for it."""
    config = build_train_config({"base_model": str(tiny_model), "dataset_path": str(dataset), **overrides},
                                config_path=None)
    before = tokenizer.calls
    return prepare_data(config, tokenizer.tokenizer), tokenizer.calls - before


def samples(data: PreparedData) -> list[tuple[list[int], list[int]]]:
    return [(e.input_ids, e.labels) for e in [*data.train, *data.eval]]


def test_a_second_preparation_reads_the_cache_and_encodes_nothing(
    tiny_model: Path, tokenizer: Counted, dataset: Path, cache_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gpt_service.data.cache")
    first, calls = prepare(tiny_model, tokenizer, dataset)
    assert calls > 0 and "cache miss" in caplog.text
    assert len(list(cache_folder.iterdir())) == 1
    again, calls = prepare(tiny_model, tokenizer, dataset)
    assert calls == 0
    assert "tokenized data cache hit" in caplog.text and str(dataset) in caplog.text
    assert samples(again) == samples(first)
    assert [len(again.train), len(again.eval), again.truncated] == [len(first.train), len(first.eval), 0]
    assert again.dataset_sha256 == first.dataset_sha256
    assert isinstance(again.train.ids, np.memmap)  # read from the file, not copied into memory


@pytest.mark.parametrize("change", ["file", "max_length", "train_on_prompt", "dataset_format", "tokenizer",
                                    "format_version"])
def test_whatever_changes_the_tokens_tokenizes_again(
    tiny_model: Path, tokenizer: Counted, dataset: Path, cache_folder: Path, change: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before, _ = prepare(tiny_model, tokenizer, dataset, max_length=64)
    overrides: dict[str, Any] = {"max_length": 64}
    if change == "file":
        write_jsonl(dataset, [CHAT, *({"text": f"sample number {i}!"} for i in range(19))])
    elif change == "max_length":
        overrides["max_length"] = 8
    elif change == "train_on_prompt":
        overrides["train_on_prompt"] = True
    elif change == "dataset_format":
        overrides["dataset_format"] = "txt"  # each line a text record, JSON and all
    elif change == "tokenizer":
        tokenizer.tokenizer = copy.deepcopy(tokenizer.tokenizer)
        tokenizer.tokenizer.chat_template = None
    else:
        monkeypatch.setattr(cache, "FORMAT_VERSION", cache.FORMAT_VERSION + 1)
    after, calls = prepare(tiny_model, tokenizer, dataset, **overrides)
    assert calls > 0
    if change != "format_version":
        assert samples(after) != samples(before)
    assert len(list(cache_folder.iterdir())) == 2  # beside the first entry


def test_the_validation_file_is_cached_too(tiny_model: Path, tokenizer: Counted, dataset: Path,
                                           cache_folder: Path, tmp_path: Path) -> None:
    evals = write_json(tmp_path / "eval.json", [{"prompt": "Q: ", "completion": "A " * 30}, {"text": "x"}])
    first, _ = prepare(tiny_model, tokenizer, dataset, eval_dataset_path=str(evals), max_length=16)
    again, calls = prepare(tiny_model, tokenizer, dataset, eval_dataset_path=str(evals), max_length=16)
    assert calls == 0 and again.truncated == first.truncated == 2  # the chat of train.jsonl and one of eval.json
    assert samples(again) == samples(first)


def test_a_damaged_entry_is_tokenized_again(tiny_model: Path, tokenizer: Counted, dataset: Path,
                                            cache_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    first, _ = prepare(tiny_model, tokenizer, dataset)
    (entry,) = cache_folder.iterdir()
    (entry / "ids.npy").write_bytes(b"not an array")
    again, calls = prepare(tiny_model, tokenizer, dataset)
    assert calls > 0 and "unreadable" in caplog.text
    assert samples(again) == samples(first)
    _, calls = prepare(tiny_model, tokenizer, dataset)
    assert calls == 0  # stored whole again


def test_the_least_recently_used_entries_go_past_the_size_limit(
    tiny_model: Path, tokenizer: Counted, dataset: Path, cache_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def entry_for(max_length: int) -> set[str]:
        before = set(p.name for p in cache_folder.iterdir()) if cache_folder.exists() else set()
        prepare(tiny_model, tokenizer, dataset, max_length=max_length)
        return set(p.name for p in cache_folder.iterdir()) - before

    (a,), (b,) = entry_for(64), entry_for(32)
    assert a != b
    now = time.time()
    for name, age in ((a, 200), (b, 100)):  # used long ago: this file system's clock ticks coarsely
        os.utime(cache_folder / name / cache.META, (now - age, now - age))
    size = sum(f.stat().st_size for f in (cache_folder / a).iterdir())
    monkeypatch.setenv("GPT_SERVICE_DATA_CACHE_MAX_GB", str(2.5 * size / 1e9))  # room for two entries
    assert entry_for(64) == set()  # a hit, which makes `a` the most recently used
    (c,) = entry_for(16)
    assert {p.name for p in cache_folder.iterdir()} == {a, c}  # b was the least recently used
    _, calls = prepare(tiny_model, tokenizer, dataset, max_length=64)
    assert calls == 0


def test_off_writes_nothing(tiny_model: Path, tokenizer: Counted, dataset: Path, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPT_SERVICE_DATA_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    prepare(tiny_model, tokenizer, dataset)
    _, calls = prepare(tiny_model, tokenizer, dataset)
    assert calls > 0
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()
