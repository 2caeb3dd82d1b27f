"""Tokenized datasets cached on disk, so that a resume, another rank or the next run does not tokenize again.

An entry is a folder named by a hash of everything that changes its content: the dataset file's
SHA-256 and format, the tokenizer (its whole definition, chat template, special tokens, and the
library versions that render and split the text), `max_length`, `train_on_prompt`, and
`FORMAT_VERSION`, raised whenever the way records become tokens changes. It holds the arrays of a
`TokenizedSet` as .npy files and a meta.json, written in a temporary folder renamed into place, so
a reader finds a whole entry or none. Entries are read memory-mapped: the ranks of one machine share
one copy in the page cache.

The folder is `GPT_SERVICE_DATA_CACHE` (default `$XDG_CACHE_HOME/gpt_service/tokenized`, that is
`~/.cache/gpt_service/tokenized`; `off` turns the cache off). After each write the least recently
used entries are removed until the folder holds at most `GPT_SERVICE_DATA_CACHE_MAX_GB` (default 20).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import transformers

from gpt_service.data.examples import TokenizedDataset
from gpt_service.data.tokenized import TokenizedSet

log = logging.getLogger(__name__)

# Raise whenever a change to gpt_service/data (segments, BOS/EOS, truncation, dtypes) changes the tokens.
FORMAT_VERSION = 1
DEFAULT_MAX_GB = 20.0
META = "meta.json"
_ARRAYS = ("ids", "trained", "offsets")
_STALE_TEMPORARY_SECONDS = 24 * 3600  # a writer that died left this; no live writer takes a day


def cache_folder() -> Path | None:
    """Where entries live, or None when the cache is off."""
    setting = os.environ.get("GPT_SERVICE_DATA_CACHE", "").strip()
    if setting.lower() == "off":
        return None
    if setting:
        return Path(setting).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "gpt_service" / "tokenized"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of all that decides how the tokenizer turns text and chats into ids (not where it lives).

    Taken without calling the tokenizer, so that a cache hit encodes nothing at all.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer: its tokenizer.json
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha256(json.dumps({
        "class": type(tokenizer).__name__,
        "definition": _sha256(definition),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_tokens": tokenizer.special_tokens_map,
        "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)],
        "adds": [getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)],
        "versions": [transformers.__version__, tokenizers.__version__],
    }, sort_keys=True, default=str))


def cache_key(**fields: Any) -> str:
    """The entry name for a tokenization described by `fields` (JSON values)."""
    return _sha256(json.dumps({"format_version": FORMAT_VERSION, **fields}, sort_keys=True))


def cached(key: str, what: str, build: Callable[[], TokenizedDataset]) -> TokenizedDataset:
    """The entry `key` when the cache has it, else `build()`, stored under `key`. `what` names it in the log."""
    folder = cache_folder()
    if folder is None:
        return build()
    entry = folder / key
    if entry.is_dir():
        try:
            data = _read(entry)
        except (OSError, ValueError, KeyError) as exc:  # damaged by hand or by a full disk: make it again
            log.warning("tokenized data cache: entry %s is unreadable (%s); tokenizing %s again", entry, exc, what)
            shutil.rmtree(entry, ignore_errors=True)
        else:
            os.utime(entry / META)  # recently used: pruned last
            log.info("tokenized data cache hit for %s: %d samples, %d tokens from %s",
                     what, len(data.examples), data.examples.tokens, entry)
            return data
    started = time.perf_counter()
    data = build()
    seconds = time.perf_counter() - started
    tokens = data.examples.tokens
    log.info("tokenized data cache miss for %s: tokenized %d samples, %d tokens in %.1f s (%.2f M tokens/s)",
             what, len(data.examples), tokens, seconds, tokens / max(seconds, 1e-9) / 1e6)
    try:
        _write(folder, key, data, what)
        _prune(folder, keep=key)
    except OSError as exc:  # a read-only or full disk costs the next run a tokenization, not this run
        log.warning("tokenized data cache: cannot write to %s (%s)", folder, exc)
    return data


def _read(entry: Path) -> TokenizedDataset:
    meta = json.loads((entry / META).read_text())
    ids, trained, offsets = (np.load(entry / f"{name}.npy", mmap_mode="r") for name in _ARRAYS)
    if meta["format_version"] != FORMAT_VERSION or len(offsets) != meta["samples"] + 1 \
            or len(ids) != len(trained) or int(offsets[-1]) != len(ids):
        raise ValueError("its arrays do not match its meta.json")
    return TokenizedDataset(TokenizedSet.from_offsets(ids, trained, np.asarray(offsets)), meta["truncated"])


def _write(folder: Path, key: str, data: TokenizedDataset, what: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".tmp-{key}-{uuid.uuid4().hex}"
    temporary.mkdir()
    try:
        examples = data.examples
        offsets = np.concatenate([examples.starts, examples.ends[-1:]])
        assert np.array_equal(offsets[1:-1], examples.ends[:-1]), "only a set laid end to end is stored"
        for name, array in zip(_ARRAYS, (examples.ids, examples.trained, offsets), strict=True):
            np.save(temporary / f"{name}.npy", array)
        meta = {"format_version": FORMAT_VERSION, "samples": len(examples), "tokens": examples.tokens,
                "truncated": data.truncated, "source": what}
        (temporary / META).write_text(json.dumps(meta))
        temporary.rename(folder / key)
    except OSError:
        if (folder / key).is_dir():  # another process stored the same entry first
            return
        raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _size(entry: Path) -> int:
    return sum(f.stat().st_size for f in entry.iterdir())


def _prune(folder: Path, keep: str) -> None:
    """Remove the least recently used entries past the size limit, and temporary folders of dead writers."""
    limit = float(os.environ.get("GPT_SERVICE_DATA_CACHE_MAX_GB") or DEFAULT_MAX_GB) * 1e9
    entries = []
    for path in folder.iterdir():
        try:
            if path.name.startswith(".tmp-"):
                if time.time() - path.stat().st_mtime > _STALE_TEMPORARY_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
            elif (path / META).is_file():
                entries.append(((path / META).stat().st_mtime, _size(path), path))
        except OSError:  # removed meanwhile by another process's pruning
            continue
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)
            total -= size
