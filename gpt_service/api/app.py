"""`create_app(settings)`: the FastAPI application, its store and its worker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from gpt_service import __version__
from gpt_service.api.errors import install_error_handlers
from gpt_service.api.observability import install_metrics
from gpt_service.api.responses import install_openapi
from gpt_service.api.routes import console, evaluation, openai_compat, serving, training, workers
from gpt_service.api.security import ApiKeyMiddleware, BodyLimitMiddleware
from gpt_service.settings import ServiceSettings, load_settings
from gpt_service.tasks.store import TaskStore
from gpt_service.tasks.worker import Worker


def create_app(settings: ServiceSettings | None = None, *, run_worker: bool = True) -> FastAPI:
    """The service; with `run_worker`, a built-in worker takes tasks too (else `gpt-service worker`s do)."""
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = TaskStore(str(settings.database_url), settings.log_tail_lines)
        worker = Worker(settings, store) if run_worker else None
        app.state.store, app.state.worker = store, worker
        if worker:
            worker.start()
        yield
        if worker:
            worker.stop()
        if getattr(app.state, "inference", None) is not None:
            app.state.inference.close()
        store.close()

    app = FastAPI(title="GPT Service", version=__version__, lifespan=lifespan,
                  description="LoRA fine-tuning and serving for Hugging Face causal language models.")
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(training.router)
    app.include_router(serving.router)
    app.include_router(openai_compat.router)
    app.include_router(evaluation.router)
    app.include_router(workers.router)
    console.install(app)  # the web console at /
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    install_metrics(app)
    install_openapi(app, api_key=settings.api_key is not None)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value())

    @app.get("/health", tags=["service"])
    def health() -> dict[str, Any]:
        worker = app.state.worker
        inference = getattr(app.state, "inference", None)
        return {"status": "ok", "worker": worker.name if worker else None,
                "worker_alive": worker.alive if worker else None,
                "running_tasks": len(worker.children) if worker else 0,
                "engines_alive": inference.engines_alive() if inference else None,
                "vllm_failures": inference.vllm.failures() if inference else [],
                "models_loaded": len(inference.models()) if inference else 0}

    return app
