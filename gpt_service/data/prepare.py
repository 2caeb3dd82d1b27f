"""From a `TrainConfig` to tokenized train and validation sets, through the tokenized-data cache."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt_service.config import TrainConfig
from gpt_service.data.cache import cache_key, cached, tokenizer_fingerprint
from gpt_service.data.examples import TokenizedDataset, tokenize_records
from gpt_service.data.readers import dataset_file_format, read_records
from gpt_service.data.tokenized import TokenizedSet


@dataclass(frozen=True)
class PreparedData:
    train: TokenizedSet
    eval: TokenizedSet
    truncated: int
    dataset_sha256: str


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _split(examples: TokenizedSet, share: float, seed: int) -> tuple[TokenizedSet, TokenizedSet]:
    """Hold out `share` of the examples, chosen by a seeded permutation (never all of them)."""
    n_eval = min(int(len(examples) * share), len(examples) - 1)
    if n_eval <= 0:
        return examples, examples.subset([])
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).numpy()
    kept = np.ones(len(examples), dtype=bool)
    kept[order[:n_eval]] = False
    return examples.subset(np.flatnonzero(kept)), examples.subset(np.flatnonzero(~kept))


def prepare_data(config: TrainConfig, tokenizer: Any) -> PreparedData:
    """Read, validate and tokenize the training data (and the validation data or split).

    Each file's tokenization is cached (gpt_service/data/cache.py): the same file, tokenizer and
    options read again, by a resumed run, another rank or the next run, tokenize nothing.
    """
    fingerprint = tokenizer_fingerprint(tokenizer)

    def load(path: str) -> tuple[TokenizedDataset, str]:
        dataset_format = dataset_file_format(path, config.dataset_format)
        sha256 = file_sha256(path)
        key = cache_key(dataset_sha256=sha256, dataset_format=dataset_format, tokenizer=fingerprint,
                        max_length=config.max_length, train_on_prompt=config.train_on_prompt)
        data = cached(key, path, lambda: tokenize_records(
            tokenizer, read_records(path, dataset_format), max_length=config.max_length,
            train_on_prompt=config.train_on_prompt, source=path,
        ))
        return data, sha256

    data, sha256 = load(config.dataset_path)
    truncated = data.truncated
    if config.eval_dataset_path:
        train = data.examples
        held, _ = load(config.eval_dataset_path)
        held_out, truncated = held.examples, truncated + held.truncated
    else:
        train, held_out = _split(data.examples, config.validation_split, config.seed)
    return PreparedData(train, held_out, truncated, sha256)
