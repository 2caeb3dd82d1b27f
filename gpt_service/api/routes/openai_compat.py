"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (streaming too).

Errors on these routes come in OpenAI's shape (see api.errors), so the `openai` package raises its
usual exceptions.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from gpt_service.api.responses import STREAMED, errors
from gpt_service.api.routes.serving import check_prompt_size, check_sampling, get_inference, sse, usage
from gpt_service.api.serving_schemas import ChatRequest, CompletionRequest, OpenAIFields
from gpt_service.errors import UserError

router = APIRouter(prefix="/v1", tags=["openai"])
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 512


@router.get("/models")
def list_models(request: Request) -> dict[str, Any]:
    inference = getattr(request.app.state, "inference", None)
    names = [m["model_name"] for m in inference.models()] if inference else []
    return {"object": "list",
            "data": [{"id": n, "object": "model", "created": 0, "owned_by": "gpt-service"} for n in names]}


async def _run(request: Request, fields: OpenAIFields, *, prompt: str | None, messages: list[dict] | None,
               default_tokens: int, chat: bool) -> Any:
    settings = request.app.state.settings
    check_prompt_size(prompt if prompt is not None else "".join(m["content"] for m in messages or []), settings)
    params = check_sampling(fields, fields.token_budget(default_tokens), settings)
    inference = get_inference(request)
    served, ids = inference.encode(fields.model, params.max_tokens, prompt=prompt, messages=messages)
    seeds = [None if fields.seed is None else fields.seed + i for i in range(fields.n)]
    choices = [replace(params, seed=seed) for seed in seeds]
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": fields.model}
    if not fields.stream:
        events = await asyncio.gather(*(inference.complete(served, ids, p, request.is_disconnected) for p in choices))
        if any(e.error for e in events):
            raise RuntimeError(next(e.error for e in events if e.error))
        body = [({"message": {"role": "assistant", "content": e.text}} if chat else {"text": e.text, "logprobs": None})
                | {"index": i, "finish_reason": e.finish_reason} for i, e in enumerate(events)]
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": body,
                "usage": usage(len(ids), sum(e.completion_tokens for e in events))}
    streams = [inference.stream(served, ids, p) for p in choices]
    include_usage = bool((fields.stream_options or {}).get("include_usage"))
    return StreamingResponse(_chunks(head, streams, chat, len(ids), include_usage), media_type="text/event-stream")


async def _chunks(head: dict[str, Any], streams: list[AsyncIterator[Any]], chat: bool, prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunk stream: each choice's pieces as they come, its finish, then [DONE]."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    if chat:
        for i in range(len(streams)):
            yield sse({**head, "object": kind, "choices": [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
    completion_tokens, open_choices = 0, len(streams)
    events = _merged(streams)
    try:
        async for index, event in events:
            piece = {"delta": {"content": event.text} if event.text else {}} if chat else {
                "text": event.text, "logprobs": None}
            if event.text or event.finish_reason:
                yield sse({**head, "object": kind,
                           "choices": [{"index": index, **piece, "finish_reason": event.finish_reason}]})
            if event.finish_reason:
                open_choices -= 1
                completion_tokens += event.completion_tokens
                if not open_choices:
                    break
        if include_usage:
            yield sse({**head, "object": kind, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
        yield sse("[DONE]")
    finally:
        await events.aclose()


async def _merged(streams: list[AsyncIterator[Any]]) -> AsyncGenerator[tuple[int, Any], None]:
    """The choices' events as they come, each with its choice's index; a single choice is read directly."""
    if len(streams) == 1:
        try:
            async for event in streams[0]:
                yield 0, event
        finally:
            await streams[0].aclose()  # type: ignore[attr-defined]
        return
    merged: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Any]) -> None:
        async for event in stream:
            await merged.put((index, event))

    pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        while True:
            yield await merged.get()
    finally:
        for task in pumps:
            task.cancel()
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]


@router.post("/completions", response_model=None,
             responses=STREAMED | errors(400, 404, 413, 422, 429, 503, openai=True))
async def completions(body: CompletionRequest, request: Request) -> Any:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise UserError("prompt must be one string (lists of several prompts are not supported); send one per request")
    return await _run(request, body, prompt=prompts[0], messages=None,
                      default_tokens=DEFAULT_COMPLETION_TOKENS, chat=False)


@router.post("/chat/completions", response_model=None,
             responses=STREAMED | errors(400, 404, 413, 422, 429, 503, openai=True))
async def chat_completions(body: ChatRequest, request: Request) -> Any:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    return await _run(request, body, prompt=None, messages=messages, default_tokens=DEFAULT_CHAT_TOKENS, chat=True)
