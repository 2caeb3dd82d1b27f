"""Exceptions to HTTP answers, in one place.

Every error body says what to fix: `{"detail": "..."}` on our routes, and OpenAI's
`{"error": {"message", "type", "param", "code"}}` under /v1, so OpenAI clients raise as usual.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from gpt_service.config import ConfigError
from gpt_service.errors import UserError
from gpt_service.inference.errors import BackendConflict, BackendUnavailable, ModelExists, ModelNotLoaded, QueueFull
from gpt_service.paths import PathOutsideRoot
from gpt_service.tasks.submission import ConflictError, NotFoundError

log = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 1
STATUS_BY_ERROR: list[tuple[type[UserError], int]] = [
    (PathOutsideRoot, 403),
    (NotFoundError, 404),
    (ModelNotLoaded, 404),
    (ConflictError, 409),
    (ModelExists, 409),
    (BackendConflict, 409),
    (ConfigError, 422),
    (QueueFull, 429),
    (BackendUnavailable, 503),
]
OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def status_for(exc: UserError) -> int:
    return next((code for kind, code in STATUS_BY_ERROR if isinstance(exc, kind)), 400)


def error_response(request: Request, status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    if request.url.path.startswith("/v1/"):
        kind = OPENAI_TYPES.get(status, "invalid_request_error")
        body: dict = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> JSONResponse:
        status = status_for(exc)
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 429 else None
        return error_response(request, status, str(exc), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in exc.errors()]
        fields = [".".join(str(p) for p in e["loc"] if p != "body") or "body" for e in errors]
        message = "; ".join(f"{where}: {'unknown field' if e['type'] == 'extra_forbidden' else e['msg']}"
                            for where, e in zip(fields, errors, strict=True))
        if request.url.path.startswith("/v1/"):
            return error_response(request, 422, message, param=fields[0] if fields else None)
        return JSONResponse({"detail": message, "errors": errors}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(request, exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request, 500, f"internal error: {type(exc).__name__}: {exc}")

