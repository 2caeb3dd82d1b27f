"""A request, what it hears, and its state inside the engine (its tokens, how many are cached, its blocks)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gpt_service.inference.kv_cache import BlockTable
from gpt_service.inference.sampling import SamplingParams
from gpt_service.inference.text import TextAssembler

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass
class Event:
    """What a request hears: pieces of text, then one final event with a finish reason."""

    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None  # PEFT adapter name, None for the base model
    deliver: Callable[[Event], None]  # called from the engine thread
    cancelled: threading.Event = field(default_factory=threading.Event)


class Sequence:
    """A request in the engine: its tokens (the prompt, then the answer so far) and how many are cached.

    `computed` tokens have their keys and values in the cache; a step feeds the next ones (the rest
    of the prompt, in chunks, or the one token sampled last). When every token is computed, the
    step's logits give the next token. A preempted sequence drops its cache (`computed` = 0) and
    later computes prompt and answer again, as vLLM recomputes: what it heard stays heard.
    """

    def __init__(self, request: GenerationRequest, tokenizer: Any) -> None:
        self.request = request
        self.prompt_len = len(request.prompt_ids)
        self.tokens: list[int] = list(request.prompt_ids)
        self.computed = 0
        self.table = BlockTable()
        self.adapter = request.adapter or BASE_ADAPTER
        self.text = TextAssembler(tokenizer, request.params.stop)
        seed = request.params.seed
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.fast_greedy = request.params.greedy and request.params.repetition_penalty == 1.0
        self.finished = False

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def remaining(self) -> int:
        """Tokens still to feed before the next one can be sampled."""
        return len(self.tokens) - self.computed

    @property
    def done(self) -> bool:
        """Finished, or left by its client."""
        return self.finished or self.request.cancelled.is_set()

    def seen(self) -> torch.Tensor:
        """The prompt's and the answer's tokens so far (for the repetition penalty)."""
        return torch.tensor(self.tokens, dtype=torch.long)

    def emit(self, text: str = "", finish_reason: str | None = None, error: str | None = None) -> None:
        self.request.deliver(Event(text, finish_reason, self.prompt_len, self.generated, error))

    def finish(self, text: str, reason: str, error: str | None = None) -> None:
        self.emit(text, reason, error)
        self.finished = True
