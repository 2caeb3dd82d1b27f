"""The serving facade the HTTP routes talk to: load/unload, prompt encoding, async event streams.

Created on the first serving call (`api.routes.serving.get_inference`), so a server that only
trains never imports torch in its own process.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from gpt_service.chat import Message, render_chat
from gpt_service.inference.engine import EngineOptions, Event, GenerationRequest
from gpt_service.inference.errors import ContextTooLong
from gpt_service.inference.registry import ModelRegistry, ServedModel, context_length
from gpt_service.inference.sampling import SamplingParams
from gpt_service.settings import ServiceSettings

DISCONNECT_POLL_SECONDS = 0.25


def engine_options(settings: ServiceSettings) -> EngineOptions:
    gigabytes = settings.kv_cache_gb
    return EngineOptions(
        max_batch_size=settings.max_batch_size, max_waiting=settings.max_waiting_requests,
        fast_paths=settings.fast_paths, kv_cache_bytes=None if gigabytes is None else int(gigabytes * (1 << 30)),
        block_size=settings.kv_block_size, max_batched_tokens=settings.max_batched_tokens,
        chunked_prefill=settings.chunked_prefill, prefix_caching=settings.prefix_caching)


class InferenceService:
    def __init__(self, settings: ServiceSettings) -> None:
        self.registry = ModelRegistry(engine_options(settings))
        self.default_dtype = settings.serve_dtype
        self.generated_tokens: Counter[str] = Counter()  # per model name, for /metrics

    async def load(self, name: str, model_path: str, lora_adapter: str | None, dtype: str | None,
                   replace: bool) -> dict[str, Any]:
        served = await asyncio.to_thread(self.registry.load, name, model_path, lora_adapter,
                                         dtype or self.default_dtype, replace)
        return served.describe()

    def unload(self, name: str) -> None:
        self.registry.unload(name)

    def models(self) -> list[dict[str, Any]]:
        return [served.describe() for served in self.registry.list()]

    def engines_alive(self) -> bool:
        return all(served.base.engine.alive for served in self.registry.list())

    def close(self) -> None:
        self.registry.close()

    def encode(self, name: str, max_tokens: int, prompt: str | None = None,
               messages: list[Message] | None = None) -> tuple[ServedModel, list[int]]:
        """The model and the prompt's token ids, checked against the model's context."""
        served = self.registry.get(name)
        tokenizer = served.base.tokenizer
        if messages is not None:
            ids = tokenizer(render_chat(tokenizer, messages, add_generation_prompt=True),
                            add_special_tokens=False).input_ids
        else:
            ids = tokenizer(prompt or "").input_ids
        limit = context_length(served.base.model, tokenizer)
        if len(ids) + max_tokens > limit:
            raise ContextTooLong(
                f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}: together "
                f"{len(ids) + max_tokens}, more than the model's context of {limit} tokens; shorten the "
                "prompt or lower max_tokens"
            )
        if not ids:
            raise ContextTooLong("the prompt is empty after tokenization; give some text")
        return served, ids

    def stream(self, served: ServedModel, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Event]:
        """Queue one generation now (QueueFull is raised here) and return its events.

        Leaving the event loop early (a client gone) drops the request from the batch.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        request = GenerationRequest(prompt_ids, params, served.adapter,
                                    lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        served.base.engine.submit(request)

        async def events() -> AsyncIterator[Event]:
            try:
                while True:
                    event = await queue.get()
                    if event.finish_reason:
                        self.generated_tokens[served.name] += event.completion_tokens
                    yield event
                    if event.finish_reason:
                        return
            finally:
                request.cancelled.set()

        return events()

    async def complete(self, served: ServedModel, prompt_ids: list[int], params: SamplingParams,
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
