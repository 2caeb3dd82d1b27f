"""Greedy answers through the batching engine, scored against references with exact match and chrF.

Answers go through the same `BatchEngine` that serves the model, so they are the answers a user
would get, they share batches with live traffic (mixed adapters included) instead of stopping it,
and base and adapter answers of a comparison are generated together.

chrF (sacrebleu) compares character n-grams, so it scores Chinese, which has no spaces between
words, as well as English; exact match compares the answers with surrounding whitespace removed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sacrebleu.metrics import CHRF

from gpt_service.inference.engine import BatchEngine, Event, GenerationRequest
from gpt_service.inference.errors import QueueFull
from gpt_service.inference.sampling import SamplingParams

QUEUE_RETRY_SECONDS = 0.05
ENGINE_CHECK_SECONDS = 1.0


@dataclass(frozen=True)
class Question:
    prompt_ids: list[int]
    adapter: str | None  # PEFT adapter name; None: the base model
    max_tokens: int


@dataclass
class _Answer:
    pieces: list[str] = field(default_factory=list)
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def deliver(self, event: Event) -> None:  # called from the engine thread
        self.pieces.append(event.text)
        if event.finish_reason:
            self.error = event.error
            self.done.set()


def _submit(engine: BatchEngine, request: GenerationRequest) -> None:
    """Queue a request, waiting while live traffic fills the engine's queue."""
    while True:
        try:
            engine.submit(request)
            return
        except QueueFull:
            time.sleep(QUEUE_RETRY_SECONDS)


def greedy_answers(engine: BatchEngine, questions: list[Question],
                   on_answer: Callable[[], None] = lambda: None) -> list[str]:
    """Each question's greedy answer, at most `max_batch_size` of them in the engine at once."""
    window = max(1, min(engine.max_batch_size, engine.max_waiting))
    answers = [_Answer() for _ in questions]
    requests = [GenerationRequest(q.prompt_ids, SamplingParams(max_tokens=q.max_tokens, temperature=0.0),
                                  q.adapter, answer.deliver) for q, answer in zip(questions, answers, strict=True)]
    try:
        for request in requests[:window]:
            _submit(engine, request)
        for i, answer in enumerate(answers):
            while not answer.done.wait(ENGINE_CHECK_SECONDS):
                if not engine.alive:
                    raise RuntimeError("the generation engine stopped (was the model unloaded?)")
            if answer.error:
                raise RuntimeError(answer.error)
            if i + window < len(requests):
                _submit(engine, requests[i + window])
            on_answer()
    finally:  # stopped or failed: the rest leave the engine's batch
        for request in requests:
            request.cancelled.set()
    return ["".join(answer.pieces) for answer in answers]


@dataclass(frozen=True)
class AnswerScores:
    exact_match: float  # share of answers equal to their reference
    chrf: float  # corpus chrF, 0-100
    per_answer: list[tuple[bool, float]]  # (exact, sentence chrF) of each answer


def score_answers(answers: list[str], references: list[str]) -> AnswerScores:
    chrf = CHRF()
    hypotheses = [a.strip() for a in answers]
    targets = [r.strip() for r in references]
    per_answer = [(h == t, chrf.sentence_score(h, [t]).score) for h, t in zip(hypotheses, targets, strict=True)]
    exact = sum(hit for hit, _ in per_answer) / len(per_answer) if per_answer else 0.0
    return AnswerScores(exact, chrf.corpus_score(hypotheses, [targets]).score, per_answer)
