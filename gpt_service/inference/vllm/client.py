"""vLLM's HTTP API, as the backend uses it: its model's context, runtime LoRA loading, streamed completions.

Prompts go to vLLM as token ids, tokenized here with the model's own tokenizer, so the context check,
the usage and what vLLM computes all count the same tokens. The answer comes back as the token ids
of vLLM's streamed `/v1/completions` chunks, decoded here into the `Event`s our routes already speak.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from gpt_service.inference.engine import Event
from gpt_service.inference.errors import AdapterMismatch, BackendUnavailable
from gpt_service.inference.sampling import SamplingParams
from gpt_service.inference.text import TextAssembler

CONTROL_TIMEOUT = httpx.Timeout(120.0, connect=10.0)  # an adapter load reads its weights
STREAM_TIMEOUT = httpx.Timeout(None, connect=10.0)  # a long answer may take minutes


def completion_body(model: str, prompt_ids: list[int], params: SamplingParams) -> dict[str, Any]:
    """vLLM's /v1/completions request for our sampling parameters, streamed, with the usage at the end."""
    return {"model": model, "prompt": prompt_ids, "max_tokens": params.max_tokens,
            "temperature": 0.0 if params.greedy else params.temperature, "top_p": params.top_p,
            "top_k": params.top_k or -1, "repetition_penalty": params.repetition_penalty,
            "stop": list(params.stop), "seed": params.seed, "return_token_ids": True,
            "stream": True, "stream_options": {"include_usage": True}}


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text
    error = body.get("error", body) if isinstance(body, dict) else body
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)


class VllmClient:
    def __init__(self, url: str) -> None:
        self.url = url

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return httpx.post(f"{self.url}{path}", json=body, timeout=CONTROL_TIMEOUT)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"the vLLM server at {self.url} did not answer {path}: {exc}") from exc

    def context_length(self, served_name: str) -> int:
        """The context vLLM serves the base with (its max_model_len)."""
        models = httpx.get(f"{self.url}/v1/models", timeout=CONTROL_TIMEOUT).json()["data"]
        return int(next(m["max_model_len"] for m in models if m["id"] == served_name))

    def load_adapter(self, lora_name: str, folder: str) -> None:
        response = self._post("/v1/load_lora_adapter", {"lora_name": lora_name, "lora_path": folder})
        if response.status_code != 200:
            raise AdapterMismatch(f"vLLM refused the adapter {folder}: {_error_message(response)}")

    def unload_adapter(self, lora_name: str) -> None:
        self._post("/v1/unload_lora_adapter", {"lora_name": lora_name})

    async def stream(self, client: httpx.AsyncClient, body: dict[str, Any], text: TextAssembler
                     ) -> AsyncIterator[Event]:
        """The answer's pieces as they come, then one final event with the finish reason and the usage.

        The pieces are our own decoding of vLLM's token ids (`text`), so they are what our engine gives for the
        same tokens: whole characters only, stop strings cut the same way. A failure (vLLM's error, or its
        process gone) ends the stream with an `error` event, as our engine's failures do.
        """
        finish: Event | None = None
        try:
            async with client.stream("POST", f"{self.url}/v1/completions", json=body,
                                     timeout=STREAM_TIMEOUT) as response:
                if response.status_code != 200:
                    await response.aread()
                    yield Event(finish_reason="error", error=f"vLLM: {_error_message(response)}")
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: "):])
                    if "error" in chunk:
                        yield Event(finish_reason="error", error=f"vLLM: {chunk['error'].get('message')}")
                        return
                    for choice in chunk.get("choices", []):
                        for token in choice.get("token_ids") or []:
                            piece, stopped = text.add(token)
                            if stopped:  # leaving the stream aborts vLLM's request
                                yield Event(piece, "stop", len(body["prompt"]), len(text.tokens))
                                return
                            if piece:
                                yield Event(piece)
                        if choice.get("finish_reason"):
                            finish = Event(text.flush(), choice["finish_reason"])
                    if chunk.get("usage") and finish is not None:
                        finish.prompt_tokens = chunk["usage"]["prompt_tokens"]
                        finish.completion_tokens = chunk["usage"]["completion_tokens"]
        except httpx.HTTPError as exc:
            yield Event(finish_reason="error", error=f"the vLLM server at {self.url} failed mid-answer: {exc!r}")
            return
        yield finish or Event(finish_reason="error", error="vLLM's answer ended without a finish reason")
