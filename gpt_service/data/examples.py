"""Turn records into tokenized training examples with labels.

Each record becomes segments of text, each trained on or not: plain `text` is trained on whole;
chat (`messages`), instruction (`instruction`/`input`/`output`) and `prompt`/`completion`
records train only their answers unless `train_on_prompt`. Every example ends with the EOS token,
and that EOS stays in the labels: labels are masked by position, never by token id, so a pad
token equal to EOS cannot hide it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpt_service.chat import ChatRenderer
from gpt_service.data.readers import DatasetError, Record
from gpt_service.data.tokenized import TokenizedSet, id_dtype

Segment = tuple[str, bool]  # (text, is the answer)

RECORD_KINDS = 'text, messages, instruction/output or prompt/completion'
# Characters of segment text tokenized in one batch call: enough for the tokenizer's threads to share
# the work, few enough that the tokenizer's per-token records (ids, offsets, token strings: about 100
# bytes a token) and the Python lists of ids stay a few tens of MB.
CHUNK_CHARS = 1 << 19


@dataclass(frozen=True)
class TokenizedDataset:
    examples: TokenizedSet
    truncated: int  # samples cut to max_length


def _field(record: Record, key: str, where: str, expected: type = str) -> Any:
    value = record[key]
    if not isinstance(value, expected):
        raise DatasetError(
            f'{where}: "{key}" must be a {expected.__name__}, found {type(value).__name__}'
        )
    return value


def _chat_segments(render: ChatRenderer, messages: Any, where: str) -> list[Segment]:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}}')
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DatasetError(f'{where}: message {i + 1} needs a string "role" and "content"')
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f'{where}: "messages" has no assistant message to learn from')
    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], add_generation_prompt=True)
        full = render(messages[: i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DatasetError(f"{where}: the chat template does not render messages incrementally")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return segments


def record_segments(tokenizer: Any, record: Record, where: str, render: ChatRenderer | None = None) -> list[Segment]:
    """Split one record into (text, is-answer) segments, checking its keys and types.

    Chats are rendered by `render`, or by a `ChatRenderer` of `tokenizer`: pass one to split many records.
    """
    if "text" in record:
        return [(_field(record, "text", where), True)]
    if "messages" in record:
        return _chat_segments(render or ChatRenderer(tokenizer), record["messages"], where)
    if "instruction" in record and "output" in record:
        instruction = _field(record, "instruction", where)
        extra = _field(record, "input", where) if record.get("input") is not None else ""
        prompt = f"{instruction}\n{extra}\n" if extra else f"{instruction}\n"
        return [(prompt, False), (_field(record, "output", where), True)]
    if "prompt" in record and "completion" in record:
        return [(_field(record, "prompt", where), False), (_field(record, "completion", where), True)]
    keys = ", ".join(f'"{k}"' for k in record) or "none"
    raise DatasetError(f'{where} has no "text" (its keys: {keys}); expected {RECORD_KINDS}')


def _leading_special_ids(tokenizer: Any) -> list[int]:
    """The BOS a tokenizer puts before plain text (Llama), or nothing (Qwen2)."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a").input_ids[:1] == [bos] else []


@dataclass(frozen=True)
class _Chunk:
    """Some records' segment texts, in order, and what each becomes: a segment is trained on or not;
    a record has a number of segments and takes the leading BOS or not."""

    texts: list[str]
    trained: list[bool]
    segment_counts: list[int]
    leads: list[bool]


def _chunks(tokenizer: Any, records: list[Record], train_on_prompt: bool, source: str | Path) -> Iterator[_Chunk]:
    """The records' segments, checked, in chunks of about `CHUNK_CHARS` characters."""
    chunk, chars = _Chunk([], [], [], []), 0
    render = ChatRenderer(tokenizer)
    for index, record in enumerate(records):
        segments = record_segments(tokenizer, record, f"{source}: record {index + 1}", render)
        chunk.texts.extend(text for text, _ in segments)
        chunk.trained.extend(is_answer or train_on_prompt for _, is_answer in segments)
        chunk.segment_counts.append(len(segments))
        chunk.leads.append("messages" not in record)  # a chat template writes its own specials
        chars += sum(len(text) for text, _ in segments)
        if chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = _Chunk([], [], [], []), 0
    if chunk.leads:
        yield chunk


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """The ids of each text, without special tokens, in one call that spreads the texts over the cores.

    A fast tokenizer's own `encode_batch_fast` gives the ids of `tokenizer(texts)` without computing
    the character offsets that nothing here reads.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]


class _Builder:
    """Assembles tokenized segments into samples: the BOS, the EOS, truncation; flat arrays."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise DatasetError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
        self.lead = np.array(_leading_special_ids(tokenizer), dtype=np.int64)
        self.dtype = id_dtype(max(len(tokenizer), self.eos + 1))
        self.max_length = max_length
        self.ids: list[np.ndarray] = []
        self.trained: list[np.ndarray] = []
        self.lengths: list[int] = []
        self.truncated = 0

    def add(self, chunk: _Chunk, token_lists: list[list[int]]) -> None:
        """Append the samples of `chunk`, given the token ids of its segment texts."""
        sizes = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
        flat = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=int(sizes.sum()))
        flat_trained = np.repeat(np.array(chunk.trained, dtype=bool), sizes)
        segment_ends = np.concatenate([[0], np.cumsum(sizes)])
        bounds = segment_ends[np.cumsum([0, *chunk.segment_counts])].tolist()  # each record's tokens in `flat`
        n_lead = len(self.lead)
        most = len(flat) + len(chunk.leads) * (n_lead + 1)
        ids, trained = np.empty(most, dtype=np.int64), np.empty(most, dtype=bool)
        pos = 0
        for record, lead in enumerate(chunk.leads):
            start, (a, b) = pos, bounds[record : record + 2]
            if lead and n_lead:
                ids[pos : pos + n_lead], trained[pos : pos + n_lead] = self.lead, False
                pos += n_lead
            ids[pos : pos + b - a], trained[pos : pos + b - a] = flat[a:b], flat_trained[a:b]
            pos += b - a
            if pos == start or ids[pos - 1] != self.eos:
                ids[pos], trained[pos] = self.eos, True
                pos += 1
            if pos - start > self.max_length:
                self.truncated += 1
                pos = start + self.max_length
            self.lengths.append(pos - start)
        if pos and ids[:pos].max() > np.iinfo(self.dtype).max:  # an id past the tokenizer's own size
            self.dtype = np.uint32
        self.ids.append(ids[:pos].astype(self.dtype))
        self.trained.append(trained[:pos].copy())

    def result(self) -> TokenizedDataset:
        offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        ids = np.concatenate(self.ids).astype(self.dtype, copy=False) if self.ids else np.empty(0, self.dtype)
        trained = np.concatenate(self.trained) if self.trained else np.empty(0, bool)
        return TokenizedDataset(TokenizedSet.from_offsets(ids, trained, offsets), self.truncated)


def tokenize_records(
    tokenizer: Any,
    records: list[Record],
    *,
    max_length: int,
    train_on_prompt: bool,
    source: str | Path,
) -> TokenizedDataset:
    """Tokenize every record into a sample, truncating to `max_length`.

    Records go in chunks: each chunk's segment texts are built first (checking the records and
    rendering the chats: Python, one core), then tokenized in one batch call (Rust, every core) in a
    thread of its own while the next chunk is built.
    """
    builder = _Builder(tokenizer, max_length)
    pending: tuple[_Chunk, Future[list[list[int]]]] | None = None
    with ThreadPoolExecutor(max_workers=1) as encoder:
        for chunk in _chunks(tokenizer, records, train_on_prompt, source):
            encoding = encoder.submit(_encode, tokenizer, chunk.texts)
            if pending:
                builder.add(pending[0], pending[1].result())
            pending = (chunk, encoding)
        if pending:
            builder.add(pending[0], pending[1].result())
    return builder.result()
