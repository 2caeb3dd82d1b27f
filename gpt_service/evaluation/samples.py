"""The records of an evaluation, tokenized exactly as training tokenizes them, and their prompts.

Token figures use the training examples (labels on the answers only). A record with a reference
answer (chat, instruction, prompt/completion) is also asked its last question: the prompt is the
example's tokens before its last answer, so the model is prompted exactly as it was trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpt_service.data.examples import record_segments, tokenize_records
from gpt_service.data.readers import DatasetError, Record, read_records
from gpt_service.data.tokenized import IGNORE_INDEX, TokenizedSet
from gpt_service.evaluation.job import EvaluationOptions


@dataclass(frozen=True)
class Prompted:
    """One record to answer: its prompt tokens and text, and the reference answer."""

    prompt_ids: list[int]
    prompt: str
    reference: str


@dataclass(frozen=True)
class EvalSet:
    examples: TokenizedSet
    prompted: list[Prompted]  # empty when generation metrics are off
    truncated: int  # samples cut to max_length


def read_eval_records(options: EvaluationOptions) -> list[Record]:
    """The dataset's records, the first `max_samples` of them when that is set."""
    records = read_records(options.dataset_path, options.dataset_format)
    return records[: options.max_samples] if options.max_samples else records


def reference_answer(tokenizer: Any, record: Record, where: str) -> str | None:
    """The record's last answer, or None for plain text (nothing to compare an answer with)."""
    if "text" in record:
        return None
    if "messages" in record:
        return next(m["content"] for m in reversed(record["messages"]) if m["role"] == "assistant")
    return record_segments(tokenizer, record, where)[-1][0]


def answer_start(labels: list[int]) -> int | None:
    """Where the last run of labelled tokens (the last answer and its EOS) begins; None without a prompt."""
    end = len(labels)
    while end and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start if 0 < start < end else None


def load_eval_set(tokenizer: Any, records: list[Record], options: EvaluationOptions) -> EvalSet:
    """Tokenize the records; raise DatasetError when generation is asked for and nothing has a reference."""
    source = options.dataset_path
    data = tokenize_records(tokenizer, records, max_length=options.max_length, train_on_prompt=False,
                            source=source)
    prompted = []
    if options.generation is not False:
        eos = tokenizer.eos_token_id
        for index, (record, example) in enumerate(zip(records, data.examples, strict=True)):
            reference = reference_answer(tokenizer, record, f"{source}: record {index + 1}")
            start = answer_start(example.labels)
            if reference is None or start is None or example.input_ids[-1] != eos:  # no prompt, or cut short
                continue
            ids = example.input_ids[:start]
            prompted.append(Prompted(ids, tokenizer.decode(ids), reference))
    if options.generation and not prompted:
        raise DatasetError(
            f"{source}: no record has a reference answer to compare generations with (plain text records "
            "have none; chat, instruction/output and prompt/completion records do); set generation to false "
            "to measure the loss only"
        )
    return EvalSet(data.examples, prompted, data.truncated)
