"""Exceptions to HTTP answers, in one place. Every error body has a `detail` a person can act on."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from gpt_service.config import ConfigError
from gpt_service.errors import UserError
from gpt_service.paths import PathOutsideRoot
from gpt_service.tasks.submission import ConflictError, NotFoundError

STATUS_BY_ERROR: list[tuple[type[UserError], int]] = [
    (PathOutsideRoot, 403),
    (NotFoundError, 404),
    (ConflictError, 409),
    (ConfigError, 422),
]


def status_for(exc: UserError) -> int:
    return next((code for kind, code in STATUS_BY_ERROR if isinstance(exc, kind)), 400)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UserError)
    async def _user_error(_request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status_for(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
            problems.append(f"{where}: {'unknown field' if err['type'] == 'extra_forbidden' else err['msg']}")
        return JSONResponse({"detail": "; ".join(problems), "errors": exc.errors()}, status_code=422)
