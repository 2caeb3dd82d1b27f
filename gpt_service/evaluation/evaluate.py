"""One evaluation from start to end: token figures, generation scores, base comparison, samples.

    result = evaluate_job(EvaluationJob(model_path="models/demo", lora_adapter="models/run/lora_adapter",
                                        dataset_path="data/qa.jsonl", compare_to_base=True))

`evaluate_served` measures a model the server has loaded; `evaluate_job` loads one from folders
first (the CLI and evaluation tasks). Both report progress as (steps done, total steps) and poll
`should_stop` after each step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from gpt_service.data.readers import Record
from gpt_service.evaluation.generation import AnswerScores, Question, greedy_answers, score_answers
from gpt_service.evaluation.job import EvaluationJob, EvaluationOptions, check_comparison
from gpt_service.evaluation.metrics import TokenFigures, token_figures
from gpt_service.evaluation.samples import EvalSet, Prompted, load_eval_set, read_eval_records
from gpt_service.inference.registry import ModelRegistry, ServedModel, context_length
from gpt_service.model_loading import load_tokenizer

ProgressCallback = Callable[[int, int], None]
StopCheck = Callable[[], bool]
# Greedy answers to questions, calling back after each; default: the base's own engine (greedy_answers).
Answerer = Callable[[list[Question], Callable[[], None]], list[str]]
FIGURES = ("loss", "perplexity", "token_accuracy", "exact_match", "chrf")


class EvaluationStopped(Exception):
    """`should_stop` asked the evaluation to stop."""


class _Steps:
    def __init__(self, total: int, on_progress: ProgressCallback | None, should_stop: StopCheck | None) -> None:
        self.done, self.total = 0, total
        self.on_progress = on_progress or (lambda done, total: None)
        self.should_stop = should_stop or (lambda: False)

    def advance(self) -> None:
        self.done += 1
        self.on_progress(self.done, self.total)
        if self.should_stop():
            raise EvaluationStopped


def _figures(tokens: TokenFigures, scores: AnswerScores | None) -> dict[str, float | None]:
    return {"loss": tokens.loss, "perplexity": tokens.perplexity, "token_accuracy": tokens.token_accuracy,
            "exact_match": scores.exact_match if scores else None, "chrf": scores.chrf if scores else None}


def _difference(tuned: dict[str, float | None], base: dict[str, float | None]) -> dict[str, float | None]:
    """tuned - base for each figure: negative loss and perplexity, positive accuracy and scores are gains."""
    difference: dict[str, float | None] = {}
    for key in FIGURES:
        a, b = tuned[key], base[key]
        difference[key] = a - b if a is not None and b is not None else None
    return difference


def _samples(prompted: list[Prompted], answers: list[list[str]], scores: list[AnswerScores],
             count: int) -> list[dict[str, Any]]:
    """The first `count` (prompt, reference, answer) triples with their scores; base_* for the base."""
    samples = []
    for i, question in enumerate(prompted[:count]):
        sample: dict[str, Any] = {"prompt": question.prompt, "reference": question.reference}
        for prefix, variant_answers, variant_scores in zip(("", "base_"), answers, scores, strict=False):
            exact, chrf = variant_scores.per_answer[i]
            sample |= {f"{prefix}answer": variant_answers[i], f"{prefix}exact_match": exact, f"{prefix}chrf": chrf}
        samples.append(sample)
    return samples


def run_evaluation(served: ServedModel, data: EvalSet, options: EvaluationOptions,
                   on_progress: ProgressCallback | None = None, should_stop: StopCheck | None = None,
                   answer: Answerer | None = None) -> dict[str, Any]:
    """Measure `served` (its adapter on, if it has one) and, with compare_to_base, its base alone."""
    started = time.perf_counter()
    check_comparison(options, served.adapter)
    base = served.base
    variants = [served.adapter, None] if options.compare_to_base else [served.adapter]
    limit = context_length(base.model, base.tokenizer)
    prompted = [p for p in data.prompted if len(p.prompt_ids) < limit]
    batches = math.ceil(len(data.examples) / options.batch_size)
    steps = _Steps(len(variants) * (batches + len(prompted)), on_progress, should_stop)
    tokens = [token_figures(base, v, data.examples, options.batch_size, steps.advance) for v in variants]
    questions = [Question(p.prompt_ids, v, min(options.max_tokens, limit - len(p.prompt_ids)))
                 for v in variants for p in prompted]
    answers = (answer or partial(greedy_answers, base.engine))(questions, steps.advance)
    per_variant = [answers[i * len(prompted) : (i + 1) * len(prompted)] for i in range(len(variants))]
    references = [p.reference for p in prompted]
    scores = [score_answers(a, references) for a in per_variant] if prompted else []
    figures = [_figures(t, scores[i] if scores else None) for i, t in enumerate(tokens)]
    return {
        "model_name": served.name, "model_path": base.source, "lora_adapter": served.adapter_path,
        "dtype": str(base.dtype).removeprefix("torch."), "dataset_path": options.dataset_path,
        "samples": len(data.examples), "tokens": tokens[0].tokens, "truncated_samples": data.truncated,
        "generated_samples": len(prompted), "metrics": figures[0],
        "base_metrics": figures[1] if options.compare_to_base else None,
        "difference": _difference(figures[0], figures[1]) if options.compare_to_base else None,
        "examples": _samples(prompted, per_variant, scores, options.num_examples),
        "time_seconds": round(time.perf_counter() - started, 3),
    }


def evaluate_served(served: ServedModel, records: list[Record], options: EvaluationOptions,
                    on_progress: ProgressCallback | None = None, should_stop: StopCheck | None = None,
                    answer: Answerer | None = None) -> dict[str, Any]:
    """Evaluate a loaded model on `records` (already read from options.dataset_path)."""
    data = load_eval_set(served.base.tokenizer, records, options)
    return run_evaluation(served, data, options, on_progress, should_stop, answer)


def evaluate_job(job: EvaluationJob, on_progress: ProgressCallback | None = None,
                 should_stop: StopCheck | None = None, answer: Answerer | None = None) -> dict[str, Any]:
    """Load the job's model (and adapter) in this process, evaluate it, and let it go.

    With `answer`, the answers come from elsewhere (a vLLM server of the same model), the token figures from here.
    """
    started = time.perf_counter()
    check_comparison(job, job.lora_adapter)
    records = read_eval_records(job)
    load_eval_set(load_tokenizer(job.model_path), records, job)  # a bad dataset fails before the weights load
    registry = ModelRegistry()
    try:
        served = registry.load(job.model_name or Path(job.model_path).name, job.model_path, job.lora_adapter,
                               job.dtype)
        result = evaluate_served(served, records, job, on_progress, should_stop, answer)
    finally:
        registry.close()
    return result | {"time_seconds": round(time.perf_counter() - started, 3)}
