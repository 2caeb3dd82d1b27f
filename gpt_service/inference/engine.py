"""Continuous batching over one base model and any number of its LoRA adapters.

One thread per base model runs the loop. At every token step, waiting requests join the running
batch (their prompts are prefilled together, then their KV caches are merged into the batch's)
and finished ones leave it. Rows of different adapters share the batch through PEFT's
mixed-adapter forward (`adapter_names`). The batch's KV cache is left-padded: each row keeps its
own keys and values, and the attention mask hides the padding.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from gpt_service.inference.errors import ModelNotLoaded, QueueFull
from gpt_service.inference.sampling import SamplingParams, sample_row
from gpt_service.inference.text import TextAssembler

log = logging.getLogger(__name__)
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


class _Row:
    """A running sequence: its request, its tokens so far, its sampler state."""

    def __init__(self, request: GenerationRequest, tokenizer: Any) -> None:
        self.request = request
        self.text = TextAssembler(tokenizer, request.params.stop)
        self.generated: list[int] = []
        self.position = len(request.prompt_ids)  # position id of the next token fed in
        seed = request.params.seed
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.seen = torch.tensor(request.prompt_ids, dtype=torch.long)

    def emit(self, text: str = "", finish_reason: str | None = None, error: str | None = None) -> None:
        self.request.deliver(Event(text, finish_reason, len(self.request.prompt_ids), len(self.generated), error))


class BatchEngine:
    """Serves generation requests for one (PEFT-wrapped or plain) causal LM."""

    def __init__(self, model_ref: Callable[[], Any], tokenizer: Any, eos_ids: set[int], *,
                 max_batch_size: int = 64, max_waiting: int = 256, name: str = "engine") -> None:
        self.model_ref = model_ref  # the registry may wrap the base in a PeftModel later
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.model_lock = threading.RLock()  # held for each step; adapters change only between steps
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._wake = threading.Condition()
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # -- the public side ---------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        with self._wake:
            if self._closing:
                raise ModelNotLoaded("this model is being unloaded")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting for this model")
            self._waiting.append(request)
            self._wake.notify()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        return len(self._rows), len(self._waiting)

    def uses_adapter(self, adapter: str) -> bool:
        with self._wake:
            return any(r.adapter == adapter for r in self._waiting) or any(
                row.request.adapter == adapter for row in self._rows)

    def close(self, wait: bool = True) -> None:
        """Finish what runs and waits, then stop the thread."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if wait:
            self._thread.join()

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._rows and not self._closing:
                    self._wake.wait()
                if self._closing and not self._waiting and not self._rows:
                    return
                room = self.max_batch_size - len(self._rows)
                joining = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            try:
                with self.model_lock, torch.inference_mode():
                    self._step(joining)
            except Exception as exc:  # a failed step ends its requests, never the engine
                log.exception("generation step failed")
                for row in self._rows + [_Row(r, self.tokenizer) for r in joining]:
                    row.emit(finish_reason="error", error=f"generation failed: {exc}")
                self._rows, self._cache, self._mask = [], None, None

    def _step(self, joining: list[GenerationRequest]) -> None:
        joining = [r for r in joining if not r.cancelled.is_set()]
        if self._rows:
            self._decode()
        if joining:
            self._prefill(joining)
        self._drop_finished()

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache, adapters: list[str]) -> torch.Tensor:
        model = self.model_ref()
        kwargs: dict[str, Any] = {}
        if hasattr(model, "peft_config"):
            kwargs["adapter_names"] = adapters
        device = model.device
        out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                    position_ids=positions.to(device), past_key_values=cache, use_cache=True,
                    logits_to_keep=1, **kwargs)
        return out.logits[:, -1].float().cpu()

    def _prefill(self, requests: list[GenerationRequest]) -> None:
        width = max(len(r.prompt_ids) for r in requests)
        pad = next(iter(self.eos_ids))
        ids = torch.full((len(requests), width), pad, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, request in enumerate(requests):
            n = len(request.prompt_ids)
            ids[i, width - n:] = torch.tensor(request.prompt_ids)
            mask[i, width - n:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache,
                               [r.adapter or BASE_ADAPTER for r in requests])
        rows = [_Row(r, self.tokenizer) for r in requests]
        self._merge(rows, cache, mask)
        self._advance(rows, logits)

    def _decode(self) -> None:
        last = torch.tensor([[row.generated[-1]] for row in self._rows], dtype=torch.long)
        positions = torch.tensor([[row.position] for row in self._rows], dtype=torch.long)
        for row in self._rows:
            row.position += 1
        assert self._mask is not None and self._cache is not None
        self._mask = torch.cat([self._mask, torch.ones((len(self._rows), 1), dtype=torch.long)], dim=1)
        logits = self._forward(last, self._mask, positions, self._cache,
                               [row.request.adapter or BASE_ADAPTER for row in self._rows])
        self._advance(self._rows, logits)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample each row's next token and tell its request."""
        for row, row_logits in zip(rows, logits, strict=True):
            params = row.request.params
            seen = torch.cat([row.seen, torch.tensor(row.generated, dtype=torch.long)])
            token = sample_row(row_logits, params, seen, row.generator)
            row.generated.append(token)
            if token in self.eos_ids:
                row.generated.pop()  # the EOS is not part of the answer
                row.emit(row.text.flush(), finish_reason="stop")
                row.request.cancelled.set()
                continue
            piece, stopped = row.text.add(token)
            if stopped:
                row.emit(piece, finish_reason="stop")
                row.request.cancelled.set()
            elif len(row.generated) >= params.max_tokens:
                row.emit(piece + row.text.flush(), finish_reason="length")
                row.request.cancelled.set()
            elif piece:
                row.emit(piece)

    def _merge(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add prefilled rows to the running batch, left-padding whichever cache is shorter."""
        if self._cache is None or not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        assert self._mask is not None
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        for old_layer, new_layer in zip(self._cache.layers, cache.layers, strict=True):
            for attr in ("keys", "values"):
                a, b = getattr(old_layer, attr), getattr(new_layer, attr)
                a = torch.nn.functional.pad(a, (0, 0, width - old_len, 0))
                b = torch.nn.functional.pad(b, (0, 0, width - new_len, 0))
                setattr(old_layer, attr, torch.cat([a, b], dim=0))
        self._mask = torch.cat([torch.nn.functional.pad(self._mask, (width - old_len, 0)),
                                torch.nn.functional.pad(mask, (width - new_len, 0))], dim=0)
        self._rows = self._rows + rows

    def _drop_finished(self) -> None:
        """Rows that finished or whose client left leave the batch; all-padding columns go too."""
        keep = [i for i, row in enumerate(self._rows) if not row.request.cancelled.is_set()]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        assert self._cache is not None and self._mask is not None
        index = torch.tensor(keep)
        self._mask = self._mask[index]
        start = int((self._mask.sum(0) > 0).nonzero()[0])
        self._mask = self._mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index.to(layer.keys.device), :, start:]
            layer.values = layer.values[index.to(layer.values.device), :, start:]
        self._rows = [self._rows[i] for i in keep]
