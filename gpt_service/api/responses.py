"""What the OpenAPI document says each route answers besides success: the error codes and their one body shape.

Every error on our routes is `ErrorBody` (`{"detail": "what to fix"}`, plus the field list on a 422);
under /v1 it is OpenAI's `{"error": {...}}`, so OpenAI clients raise as usual. Routes name the codes
they can answer with `errors(...)`; `install_openapi` then makes the document say the same for what
every route shares: FastAPI's own 422 entry is replaced by ours, and 401 is added where an API key guards
the routes.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from gpt_service.api.security import OPEN_PATHS

WHY = {
    400: "The request cannot be carried out as sent; the message says what to fix.",
    401: "Missing or wrong API key: send `Authorization: Bearer <key>`.",
    403: "A path outside the workspace's roots (datasets under data/, models under models/).",
    404: "No such task, model, file or folder.",
    409: "In conflict with the current state (a name or folder in use, a task in the wrong state).",
    413: "The request body is over the server's limit.",
    422: "A field is missing, of the wrong type or out of range; the message names each one.",
    429: "Too many requests wait for this model; retry after the `Retry-After` seconds.",
    503: "The model's vLLM server did not come up or has stopped; the message says why (its log's end). "
         "Loading a model on that base again restarts it.",
}


class FieldError(BaseModel):
    type: str = Field(description="pydantic's error type, e.g. `missing`, `extra_forbidden`")
    loc: list[str | int] = Field(description="where the field is: `body`, `query` or `path`, then its name")
    msg: str


class ErrorBody(BaseModel):
    """Every error of our own routes."""

    detail: str = Field(description="what went wrong and what to fix, in words")
    errors: list[FieldError] | None = Field(None, description="on a 422 only: each field at fault")


class OpenAIError(BaseModel):
    message: str
    type: str = Field(description="`invalid_request_error`, `not_found_error`, `rate_limit_error`, ...")
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    """Every error under /v1, in OpenAI's shape."""

    error: OpenAIError


# The 200 of a route that answers JSON, or server-sent events when the request asks `stream: true`
# (before OpenAPI 3.2, an event stream's `schema` describes one event).
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "one JSON chunk; the last event's data is `[DONE]`"}}}
STREAMED = {200: {"description": "JSON; with `stream: true`, server-sent events, then `data: [DONE]`.",
                  "content": {"text/event-stream": {"schema": SSE_EVENT}}}}


def errors(*codes: int, openai: bool = False) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that can answer each of `codes`."""
    model = OpenAIErrorBody if openai else ErrorBody
    return {code: {"model": model, "description": WHY[code]} for code in codes}


def _error_body(path: str) -> dict[str, Any]:
    name = (OpenAIErrorBody if path.startswith("/v1/") else ErrorBody).__name__
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}


def install_openapi(app: FastAPI, api_key: bool) -> None:
    """Make the served document tell what every route shares: our 422 body, and 401 under an API key."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            for model in (ErrorBody, OpenAIErrorBody):
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}), **{model.__name__: body})
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    answers = operation["responses"]
                    if "422" in answers:
                        answers["422"] = {"description": WHY[422], "content": _error_body(path)}
                    if api_key and path not in OPEN_PATHS:
                        answers["401"] = {"description": WHY[401], "content": _error_body(path)}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
