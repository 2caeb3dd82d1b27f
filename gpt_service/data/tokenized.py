"""Tokenized samples held as flat arrays: a few bytes a token instead of two Python lists of ints.

Every sample's token ids lie end to end in one array (uint16 where the vocabulary fits, else
uint32), beside one bool array saying which positions are trained on (the labels: the token
itself where true, `IGNORE_INDEX` where false). A set is those two arrays plus where each sample
starts and ends, so a subset (the validation split) is two small index arrays over the same
memory, and a set loaded from the cache reads its arrays memory-mapped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100


def id_dtype(vocabulary_size: int) -> type[np.unsignedinteger]:
    """The smallest unsigned type that holds every id of a vocabulary of this size."""
    return np.uint16 if vocabulary_size <= 1 << 16 else np.uint32


@dataclass(frozen=True, eq=False)
class Example:
    """One sample: its token ids and which of them are trained on (views into a `TokenizedSet`)."""

    ids: np.ndarray
    trained: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def input_ids(self) -> list[int]:
        return self.ids.tolist()

    @property
    def labels(self) -> list[int]:
        """The ids where trained on, `IGNORE_INDEX` elsewhere (labels masked by position, never by id)."""
        return self.label_array().tolist()

    def label_array(self) -> np.ndarray:
        return np.where(self.trained, self.ids.astype(np.int64), IGNORE_INDEX)


@dataclass(frozen=True, eq=False)
class TokenizedSet:
    """Samples as flat arrays: `ids` and `trained` hold every sample's tokens; sample i is
    `ids[starts[i]:ends[i]]`."""

    ids: np.ndarray
    trained: np.ndarray
    starts: np.ndarray  # int64
    ends: np.ndarray  # int64

    @classmethod
    def from_offsets(cls, ids: np.ndarray, trained: np.ndarray, offsets: np.ndarray) -> TokenizedSet:
        """Samples laid end to end: sample i is `ids[offsets[i]:offsets[i + 1]]`."""
        return cls(ids, trained, offsets[:-1], offsets[1:])

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> Example:
        start, end = int(self.starts[index]), int(self.ends[index])
        return Example(self.ids[start:end], self.trained[start:end])

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> list[int]:
        return (self.ends - self.starts).tolist()

    @property
    def tokens(self) -> int:
        return int((self.ends - self.starts).sum())

    def subset(self, indices: Sequence[int] | np.ndarray) -> TokenizedSet:
        """The samples at `indices`, in that order, sharing this set's token arrays."""
        where = np.asarray(indices, dtype=np.int64)
        return TokenizedSet(self.ids, self.trained, self.starts[where], self.ends[where])

    def label_count(self, indices: Sequence[int]) -> int:
        """Positions that the loss counts in these samples: trained ones after each sample's first
        (a causal LM predicts position t from those before it)."""
        return sum(int(self.trained[self.starts[i] + 1 : self.ends[i]].sum()) for i in indices)
