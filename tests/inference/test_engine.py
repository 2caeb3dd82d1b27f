"""The engine end to end on the tiny model in fp32: every way through it gives `generate`'s greedy answers.

Batched equals alone: the prompts go in together, through the paged forward (whole prompts, tiny
chunks, a pool so small that sequences are preempted and computed again, a shared cached prefix)
and through the model's own forward, and each answer must equal transformers' `generate` for that
prompt alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gpt_service.inference.engine import BatchEngine, EngineOptions, Event, GenerationRequest, kv_bytes_per_token
from gpt_service.inference.registry import ModelRegistry
from gpt_service.inference.sampling import SamplingParams

Maker = Callable[[EngineOptions], BatchEngine]
SYSTEM = "You are a helpful assistant. Answer briefly and kindly, in the language of the question. "
PROMPTS = ["Hello", SYSTEM + "What is the capital of France?", "a", SYSTEM + "介绍一下Python" * 6,
           "LoRA is a low rank adaptation " * 12]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def expected(tiny_model: Path) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    answers = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers


@pytest.fixture()
def engine_with(tiny_model: Path) -> Iterator[Maker]:
    registries: list[ModelRegistry] = []

    def make(options: EngineOptions) -> BatchEngine:
        registries.append(ModelRegistry(options))
        return registries[-1].load("tiny", str(tiny_model), None, "float32").base.engine

    yield make
    for registry in registries:
        registry.close()


def generate(engine: BatchEngine, params: list[SamplingParams]) -> list[tuple[str, Event]]:
    """Submit every prompt at once; each one's text and final event."""
    tokenizer = engine.tokenizer
    texts: list[list[str]] = [[] for _ in PROMPTS]
    finals: list[Event | None] = [None] * len(PROMPTS)
    done = threading.Semaphore(0)

    def deliver_to(i: int) -> Callable[[Event], None]:
        def deliver(event: Event) -> None:
            texts[i].append(event.text)
            if event.finish_reason:
                finals[i] = event
                done.release()
        return deliver

    with engine.model_lock:  # the engine steps only once every prompt waits: the same schedule on any machine
        for i, (prompt, p) in enumerate(zip(PROMPTS, params, strict=True)):
            engine.submit(GenerationRequest(tokenizer(prompt).input_ids, p, None, deliver_to(i)))
    for _ in PROMPTS:
        assert done.acquire(timeout=120)
    return [("".join(t), final) for t, final in zip(texts, finals, strict=True)]  # type: ignore[misc]


def greedy() -> list[SamplingParams]:
    return [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)] * len(PROMPTS)


def pool_bytes(tiny_model: Path, tokens: int) -> int:
    return kv_bytes_per_token(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)) * tokens


@pytest.mark.parametrize("options", [
    EngineOptions(),
    EngineOptions(block_size=4, max_batched_tokens=7),  # prompts in chunks of a few tokens, between decodes
    EngineOptions(chunked_prefill=False, prefix_caching=False),
    EngineOptions(cpu_kernels=False),  # PyTorch's operators: decode attention over gathered blocks
    EngineOptions(fast_paths=False),  # the model's own forward over a contiguous cache
], ids=["paged", "chunked", "whole-prompts", "paged-pytorch-ops", "contiguous"])
def test_batched_answers_equal_generate_alone(engine_with: Maker, expected: list[str], options: EngineOptions) -> None:
    engine = engine_with(options)
    answers = generate(engine, greedy())
    assert [text for text, _ in answers] == expected
    assert engine.paged is options.fast_paths
    assert getattr(engine._runner, "kernels", False) is (options.fast_paths and options.cpu_kernels)
    assert engine.stats().kv_blocks_free == engine.stats().kv_blocks  # every block given back


def test_a_pool_too_small_for_all_preempts_and_recomputes(engine_with: Maker, expected: list[str],
                                                          tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    longest = max(len(tokenizer(p).input_ids) for p in PROMPTS) + MAX_TOKENS
    engine = engine_with(EngineOptions(block_size=4, kv_cache_bytes=pool_bytes(tiny_model, longest + 8)))
    answers = generate(engine, greedy())
    assert [text for text, _ in answers] == expected
    assert engine.stats().preemptions > 0


def test_a_shared_prefix_is_reused(engine_with: Maker, expected: list[str]) -> None:
    engine = engine_with(EngineOptions(block_size=4))
    first = generate(engine, greedy())
    hits = engine.stats().prefix_hit_tokens
    assert [text for text, _ in generate(engine, greedy())] == [text for text, _ in first] == expected
    assert engine.stats().prefix_hit_tokens - hits >= sum(len(engine.tokenizer(p).input_ids) - 4 for p in PROMPTS)


def test_a_failing_row_ends_alone(engine_with: Maker, expected: list[str]) -> None:
    """A NaN temperature (the API refuses it; the engine must survive it) fails its own row only."""
    engine = engine_with(EngineOptions())
    params = greedy()
    params[1] = SamplingParams(max_tokens=MAX_TOKENS, temperature=float("nan"))
    params[2] = SamplingParams(max_tokens=MAX_TOKENS, temperature=1e-45)  # greedy, not inf logits
    answers = generate(engine, params)
    assert answers[1][1].finish_reason == "error" and "sampling failed" in (answers[1][1].error or "")
    others = [i for i in range(len(PROMPTS)) if i != 1]
    assert [answers[i][0] for i in others] == [expected[i] for i in others]
    assert all(answers[i][1].finish_reason in ("stop", "length") for i in others)


def test_a_request_larger_than_the_pool_is_refused_alone(engine_with: Maker, expected: list[str],
                                                          tiny_model: Path) -> None:
    engine = engine_with(EngineOptions(block_size=4, kv_cache_bytes=pool_bytes(tiny_model, 64)))
    answers = generate(engine, greedy())
    too_big = [i for i, p in enumerate(PROMPTS) if len(engine.tokenizer(p).input_ids) + MAX_TOKENS > 64]
    assert too_big
    for i, (text, final) in enumerate(answers):
        if i in too_big:
            assert final.finish_reason == "error" and "KV cache" in (final.error or "")
        else:
            assert text == expected[i]


def test_closing_the_registry_waits_for_its_engines(tiny_model: Path) -> None:
    """At shutdown no engine thread may still be at work while the interpreter exits (a daemon thread freeing
    tensors then aborts the process); what runs at the close still gets its whole answer."""
    registry = ModelRegistry(EngineOptions())
    engine = registry.load("tiny", str(tiny_model), None, "float32").base.engine
    finals: list[Event] = []
    engine.submit(GenerationRequest(engine.tokenizer(PROMPTS[1]).input_ids,
                                    SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), None,
                                    lambda event: finals.append(event) if event.finish_reason else None))
    registry.close()
    assert not engine.alive
    assert [event.finish_reason for event in finals] in (["stop"], ["length"])
    assert registry.list() == []
