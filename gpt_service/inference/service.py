"""The serving facade the HTTP routes talk to: load/unload, prompt encoding, async event streams.

Created on the first serving call (`api.routes.serving.get_inference`), so a server that only
trains never imports torch in its own process.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from gpt_service.chat import Message, render_chat
from gpt_service.config import QuantizationSettings
from gpt_service.inference.engine import EngineOptions, Event, GenerationRequest
from gpt_service.inference.errors import ContextTooLong, ModelExists, ModelNotLoaded
from gpt_service.inference.registry import ModelRegistry, ServedModel, context_length
from gpt_service.inference.sampling import SamplingParams
from gpt_service.inference.vllm.backend import VllmBackend, VllmModel
from gpt_service.settings import ServiceSettings

DISCONNECT_POLL_SECONDS = 0.25
Served = ServedModel | VllmModel


def engine_options(settings: ServiceSettings) -> EngineOptions:
    gigabytes = settings.kv_cache_gb
    return EngineOptions(
        max_batch_size=settings.max_batch_size, max_waiting=settings.max_waiting_requests,
        fast_paths=settings.fast_paths, cpu_kernels=settings.cpu_kernels,
        kv_cache_bytes=None if gigabytes is None else int(gigabytes * (1 << 30)),
        block_size=settings.kv_block_size, max_batched_tokens=settings.max_batched_tokens,
        chunked_prefill=settings.chunked_prefill, prefix_caching=settings.prefix_caching)


class LoopHandoff:
    """Hands the engine thread's events to their queues on an event loop, one wake-up of the loop for all
    the events that came meanwhile (a step's tokens for every request), not one per event."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # weak: the service's table of handoffs is keyed by the loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Event], Event]] = []

    def put(self, queue: asyncio.Queue[Event], event: Event) -> None:
        """From any thread."""
        with self._lock:
            self._pending.append((queue, event))
            if len(self._pending) > 1:  # a wake-up is already on its way
                return
        loop = self._loop()
        if loop is not None:
            loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


class InferenceService:
    """Names served by our engine (`registry`) or by vLLM servers (`vllm`), behind one interface."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.registry = ModelRegistry(engine_options(settings))
        self.vllm = VllmBackend(settings)
        self.default_dtype = settings.serve_dtype
        self.default_backend = settings.serving_backend
        self.generated_tokens: Counter[str] = Counter()  # per model name, for /metrics
        self._handoffs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopHandoff] = \
            weakref.WeakKeyDictionary()

    async def load(self, name: str, model_path: str, lora_adapter: str | None, dtype: str | None,
                   replace: bool, backend: str | None = None, vllm_options: tuple[str, ...] = (),
                   quantization: QuantizationSettings | None = None) -> dict[str, Any]:
        """Load on the chosen backend; a name taken on the other one goes from there (with `replace`)."""
        on_vllm = (backend or self.default_backend) == "vllm"
        on_builtin = any(served.name == name for served in self.registry.list())
        elsewhere = on_builtin if on_vllm else self.vllm.get(name) is not None
        if elsewhere and not replace:
            raise ModelExists(f"a model named {name!r} is already loaded; unload it or pass replace: true")
        dtype = dtype or self.default_dtype
        if on_vllm:
            served: Served = await asyncio.to_thread(self.vllm.load, name, model_path, lora_adapter, dtype, replace,
                                                     list(vllm_options))
        else:
            served = await asyncio.to_thread(self.registry.load, name, model_path, lora_adapter, dtype, replace,
                                             quantization)
        if elsewhere:
            await asyncio.to_thread((self.registry if on_vllm else self.vllm).unload, name)
        return self.describe(served)

    def get(self, name: str) -> Served:
        served = self.vllm.get(name)
        if served is not None:
            return served
        try:
            return self.registry.get(name)
        except ModelNotLoaded:
            known = ", ".join(sorted(m["model_name"] for m in self.models())) or "none"
            raise ModelNotLoaded(f"model {name!r} is not loaded (loaded: {known}); load it with "
                                 "POST /models/load") from None

    def unload(self, name: str) -> None:
        if self.vllm.get(name) is not None:
            self.vllm.unload(name)
        else:
            self.get(name)
            self.registry.unload(name)

    def describe(self, served: Served) -> dict[str, Any]:
        if isinstance(served, VllmModel):
            return {**self.vllm.describe(served), "backend": "vllm"}
        return {**served.describe(), "backend": "builtin"}

    def models(self) -> list[dict[str, Any]]:
        return [self.describe(served) for served in [*self.registry.list(), *self.vllm.list()]]

    def engines_alive(self) -> bool:
        return all(served.base.engine.alive for served in self.registry.list()) and self.vllm.alive

    def close(self) -> None:
        self.registry.close()
        self.vllm.close()

    def encode(self, name: str, max_tokens: int, prompt: str | None = None,
               messages: list[Message] | None = None) -> tuple[Served, list[int]]:
        """The model and the prompt's token ids, checked against the model's context."""
        served = self.get(name)
        tokenizer = served.base.tokenizer
        if messages is not None:
            ids = tokenizer(render_chat(tokenizer, messages, add_generation_prompt=True),
                            add_special_tokens=False).input_ids
        else:
            ids = tokenizer(prompt or "").input_ids
        limit = (served.base.context_length if isinstance(served, VllmModel)
                 else context_length(served.base.model, tokenizer))
        if len(ids) + max_tokens > limit:
            raise ContextTooLong(
                f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}: together "
                f"{len(ids) + max_tokens}, more than the model's context of {limit} tokens; shorten the "
                "prompt or lower max_tokens"
            )
        if not ids:
            raise ContextTooLong("the prompt is empty after tokenization; give some text")
        return served, ids

    def stream(self, served: Served, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Event]:
        """Queue one generation now (QueueFull, or BackendUnavailable for a dead vLLM, is raised here) and
        return its events.

        Leaving the event loop early (a client gone) drops the request from the batch.
        """
        if isinstance(served, VllmModel):
            events = self.vllm.stream(served, prompt_ids, params)
        else:
            events = self._engine_stream(served, prompt_ids, params)
        return self._counted(served.name, events)

    async def _counted(self, name: str, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        """The events, up to the final one, whose completion tokens go to the model's /metrics count."""
        try:
            async for event in events:
                if event.finish_reason:
                    self.generated_tokens[name] += event.completion_tokens
                yield event
                if event.finish_reason:
                    return
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    def _engine_stream(self, served: ServedModel, prompt_ids: list[int], params: SamplingParams
                       ) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        handoff = self._handoffs.get(loop)
        if handoff is None:
            handoff = self._handoffs[loop] = LoopHandoff(loop)
        queue: asyncio.Queue[Event] = asyncio.Queue()
        request = GenerationRequest(prompt_ids, params, served.adapter, lambda event: handoff.put(queue, event))
        served.base.engine.submit(request)

        async def events() -> AsyncIterator[Event]:
            try:
                while True:
                    event = await queue.get()
                    while not event.finish_reason and not queue.empty():  # behind: one piece for what waits
                        later = queue.get_nowait()
                        later.text = event.text + later.text
                        event = later
                    yield event
            finally:
                request.cancelled.set()

        return events()

    async def complete(self, served: Served, prompt_ids: list[int], params: SamplingParams,
                       is_disconnected: Callable[[], Awaitable[bool]]) -> Event:
        """The whole answer as one event; abandoned if the client disconnects meanwhile."""

        events = self.stream(served, prompt_ids, params)

        async def collect() -> Event:
            pieces = []
            async for event in events:
                pieces.append(event.text)
                if event.finish_reason:
                    event.text = "".join(pieces)
                    return event
            raise RuntimeError("generation ended without a finish reason")

        task = asyncio.ensure_future(collect())
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if not done and await is_disconnected():
                task.cancel()
        return await task
