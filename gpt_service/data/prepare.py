"""From a `TrainConfig` to tokenized train and validation sets."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt_service.config import TrainConfig
from gpt_service.data.examples import Example, tokenize_records
from gpt_service.data.readers import read_records


@dataclass(frozen=True)
class PreparedData:
    train: list[Example]
    eval: list[Example]
    truncated: int
    dataset_sha256: str


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _split(examples: list[Example], share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out `share` of the examples, chosen by a seeded permutation (never all of them)."""
    n_eval = min(int(len(examples) * share), len(examples) - 1)
    if n_eval <= 0:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [examples[i] for i in sorted(held)]


def prepare_data(config: TrainConfig, tokenizer: Any) -> PreparedData:
    """Read, validate and tokenize the training data (and the validation data or split)."""

    def load(path: str) -> tuple[list[Example], int]:
        records = read_records(path, config.dataset_format)
        data = tokenize_records(
            tokenizer, records, max_length=config.max_length,
            train_on_prompt=config.train_on_prompt, source=path,
        )
        return data.examples, data.truncated

    examples, truncated = load(config.dataset_path)
    if config.eval_dataset_path:
        train = examples
        held_out, eval_truncated = load(config.eval_dataset_path)
        truncated += eval_truncated
    else:
        train, held_out = _split(examples, config.validation_split, config.seed)
    return PreparedData(train, held_out, truncated, file_sha256(config.dataset_path))
