"""Turn records into tokenized training examples with labels.

Each record becomes segments of text, each trained on or not: plain `text` is trained on whole;
chat (`messages`), instruction (`instruction`/`input`/`output`) and `prompt`/`completion`
records train only their answers unless `train_on_prompt`. Every example ends with the EOS token,
and that EOS stays in the labels: labels are masked by position, never by token id, so a pad
token equal to EOS cannot hide it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt_service.chat import render_chat
from gpt_service.data.readers import DatasetError, Record

IGNORE_INDEX = -100
Segment = tuple[str, bool]  # (text, is the answer)

RECORD_KINDS = 'text, messages, instruction/output or prompt/completion'


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class TokenizedDataset:
    examples: list[Example]
    truncated: int  # samples cut to max_length


def _field(record: Record, key: str, where: str, expected: type = str) -> Any:
    value = record[key]
    if not isinstance(value, expected):
        raise DatasetError(
            f'{where}: "{key}" must be a {expected.__name__}, found {type(value).__name__}'
        )
    return value


def _chat_segments(tokenizer: Any, messages: Any, where: str) -> list[Segment]:
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
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        full = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DatasetError(f"{where}: the chat template does not render messages incrementally")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return segments


def record_segments(tokenizer: Any, record: Record, where: str) -> list[Segment]:
    """Split one record into (text, is-answer) segments, checking its keys and types."""
    if "text" in record:
        return [(_field(record, "text", where), True)]
    if "messages" in record:
        return _chat_segments(tokenizer, record["messages"], where)
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


def tokenize_records(
    tokenizer: Any,
    records: list[Record],
    *,
    max_length: int,
    train_on_prompt: bool,
    source: str | Path,
) -> TokenizedDataset:
    """Tokenize every record into an `Example`, truncating to `max_length`."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DatasetError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
    lead = _leading_special_ids(tokenizer)
    examples, truncated = [], 0
    for index, record in enumerate(records):
        where = f"{source}: record {index + 1}"
        segments = record_segments(tokenizer, record, where)
        chat = "messages" in record
        input_ids: list[int] = [] if chat else list(lead)
        labels: list[int] = [IGNORE_INDEX] * len(input_ids)
        for text, is_answer in segments:
            ids = tokenizer(text, add_special_tokens=False).input_ids
            input_ids += ids
            labels += ids if (is_answer or train_on_prompt) else [IGNORE_INDEX] * len(ids)
        if not input_ids or input_ids[-1] != eos:
            input_ids.append(eos)
            labels.append(eos)
        if len(input_ids) > max_length:
            truncated += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        examples.append(Example(input_ids, labels))
    return TokenizedDataset(examples, truncated)
