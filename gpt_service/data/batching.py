"""Length-grouped batches: samples of similar length share a batch, so little is padding.

The order is a pure function of (seed, epoch), which is what lets a resumed run see exactly the
batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gpt_service.data.tokenized import IGNORE_INDEX, Example

# Samples are sorted by length within windows of this many batches, then the batches are shuffled.
GROUP_WINDOW_BATCHES = 64
# Batches are padded to a multiple of this many positions. A CPU's oneDNN builds its matrix-multiply
# kernels for each new shape and reuses those of shapes it has seen (a [460, 512] x [512, 1408]
# product: 1.2 ms the first time, 0.7 ms after); far fewer shapes cost less than computing the few
# padded positions: training is 8% faster at a median of 100 tokens (bench/train_throughput.py;
# 32 gains as much, 64 less).
PAD_TO_MULTIPLE_OF = 16


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of each batch of one epoch: shuffled, grouped by length, batches in random order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * GROUP_WINDOW_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def rank_share(batch: list[int], rank: int, world_size: int, most: int) -> list[list[int]]:
    """One process's part of a global batch, in pieces of at most `most` samples.

    Every `world_size`-th sample, so that a length-sorted batch gives each process similar lengths.
    Every process gets the same number of pieces, some possibly empty (the caller runs those with
    no weight), since each forward pass is a collective under FSDP2.
    """
    share = batch[rank::world_size]
    largest_share = -(-len(batch) // world_size)
    pieces = max(1, -(-largest_share // most))
    return [share[i * most : (i + 1) * most] for i in range(pieces)]


def sequential_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches for evaluation: sorted by length, in a fixed order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(examples: Sequence[Example], pad_id: int, max_width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sample, rounded up to `PAD_TO_MULTIPLE_OF` but not past
    `max_width` (a model's position limit); padding is masked out of attention and labels."""
    longest = max(len(e) for e in examples)
    width = round_up(longest, PAD_TO_MULTIPLE_OF)
    if max_width is not None:
        width = max(longest, min(width, max_width))
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.from_numpy(example.ids.astype(np.int64))
        labels[row, :n] = torch.from_numpy(example.label_array())
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
