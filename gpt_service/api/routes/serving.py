"""The guide's serving calls: load and unload models, list them, generate."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from gpt_service.api.responses import STREAMED, errors
from gpt_service.api.serving_schemas import (
    MAX_STOP,
    GenerateAnswer,
    GenerateRequest,
    LoadRequest,
    SamplingFields,
    UnloadRequest,
)
from gpt_service.errors import UserError
from gpt_service.settings import ServiceSettings
from gpt_service.tasks.submission import adapter_folder, model_location

router = APIRouter(tags=["serving"])
_init_lock = threading.Lock()
MAX_STOP_CHARS = 200


def get_inference(request: Request) -> Any:
    """The app's InferenceService, created (and torch imported) on first use."""
    state = request.app.state
    with _init_lock:
        if getattr(state, "inference", None) is None:
            from gpt_service.inference.service import InferenceService

            state.inference = InferenceService(state.settings)
    return state.inference


def check_sampling(fields: SamplingFields, max_tokens: int, settings: ServiceSettings) -> Any:
    """The engine's SamplingParams for a request, after the service's own limits."""
    from gpt_service.inference.sampling import SamplingParams

    if max_tokens > settings.max_tokens_limit:
        raise UserError(f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens_limit}")
    stops = fields.stop_strings()
    if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise UserError(f"stop takes at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters each")
    return SamplingParams(max_tokens=max_tokens, temperature=fields.temperature, top_p=fields.top_p,
                          top_k=fields.top_k, repetition_penalty=fields.repetition_penalty, stop=stops,
                          seed=fields.seed)


def check_prompt_size(text: str, settings: ServiceSettings) -> None:
    if len(text) > settings.max_prompt_chars:
        raise UserError(f"the prompt has {len(text)} characters; this server allows at most "
                        f"{settings.max_prompt_chars}")


def sse(payload: Any) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@router.post("/models/load", responses=errors(400, 403, 404, 409, 413, 422, 503))
async def load_model(body: LoadRequest, request: Request) -> dict[str, Any]:
    settings: ServiceSettings = request.app.state.settings
    backend = body.backend or settings.serving_backend
    if body.vllm is not None and backend != "vllm":
        raise UserError('vllm options apply to the vLLM backend only; send "backend": "vllm" with them')
    if body.quantization is not None and backend == "vllm":
        raise UserError('quantization applies to the builtin backend; for vLLM pass its own "--quantization" '
                        "in GPT_SERVICE_VLLM_ARGS")
    model_path = model_location(body.model_path, settings, "model_path")
    adapter = adapter_folder(body.lora_adapter, settings)
    options = tuple(body.vllm.args()) if body.vllm else ()
    info = await get_inference(request).load(body.model_name, model_path, adapter, body.dtype, body.replace,
                                             backend, options, body.quantization)
    return {"status": "loaded", **info}


@router.get("/models")
def list_models(request: Request) -> dict[str, Any]:
    inference = getattr(request.app.state, "inference", None)
    return {"models": inference.models() if inference else []}


@router.delete("/models/{model_name:path}", responses=errors(404))
def delete_model(model_name: str, request: Request) -> dict[str, Any]:
    get_inference(request).unload(model_name)
    return {"status": "unloaded", "model_name": model_name}


@router.post("/models/unload", responses=errors(400, 404, 413, 422))
def unload_model(body: UnloadRequest, request: Request) -> dict[str, Any]:
    return delete_model(body.model_name, request)


@router.post("/generate", response_model=None,
             responses={200: {**STREAMED[200], "model": GenerateAnswer}, **errors(400, 404, 413, 422, 429, 503)})
async def generate(body: GenerateRequest, request: Request) -> dict[str, Any] | StreamingResponse:
    settings: ServiceSettings = request.app.state.settings
    check_prompt_size(body.prompt, settings)
    params = check_sampling(body, body.max_tokens, settings)
    inference = get_inference(request)
    served, ids = inference.encode(body.model_name, params.max_tokens, prompt=body.prompt)
    if not body.stream:
        event = await inference.complete(served, ids, params, request.is_disconnected)
        if event.error:
            raise RuntimeError(event.error)
        return {"text": event.text, "model_name": body.model_name, "finish_reason": event.finish_reason,
                "usage": usage(event.prompt_tokens, event.completion_tokens)}
    events = inference.stream(served, ids, params)

    async def body_stream() -> AsyncIterator[str]:
        async for event in events:
            payload: dict[str, Any] = {"text": event.text}
            if event.finish_reason:
                payload |= {"finish_reason": event.finish_reason,
                            "usage": usage(event.prompt_tokens, event.completion_tokens)}
                if event.error:
                    payload["error"] = event.error
            yield sse(payload)
        yield sse("[DONE]")

    return StreamingResponse(body_stream(), media_type="text/event-stream")


