"""`/metrics` in Prometheus format, and one-JSON-object-a-line logs when asked.

Request counts and latency are recorded by a middleware; queue depth, tasks by status, training
speed and models loaded are read from the store and the engines at scrape time, so they are
never stale. Each app has its own registry (no import-time globals).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpt_service.logs import JsonFormatter, logging_config
from gpt_service.tasks.store import STATUSES

__all__ = ["JsonFormatter", "install_metrics", "logging_config"]


class _StateCollector(Collector):
    """Figures read from the app's store and inference engines at each scrape."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterator[Any]:
        state = self.app.state
        tasks = GaugeMetricFamily("gpt_service_tasks", "Tasks by status.", labels=["status"])
        counts = state.store.count_by_status() if hasattr(state, "store") else {}
        for status in STATUSES:
            tasks.add_metric([status], counts.get(status, 0))
        yield tasks
        speed = GaugeMetricFamily("gpt_service_training_tokens_per_second",
                                  "Training throughput of each running task.", labels=["task_id"])
        for task in state.store.with_status("running") if hasattr(state, "store") else []:
            speed.add_metric([task.task_id], task.tokens_per_second or 0.0)
        yield speed
        inference = getattr(state, "inference", None)
        models = inference.models() if inference else []
        yield GaugeMetricFamily("gpt_service_models_loaded", "Model names loaded.", value=len(models))
        depth = GaugeMetricFamily("gpt_service_queue_depth", "Requests waiting, per model.", labels=["model"])
        running = GaugeMetricFamily("gpt_service_requests_running", "Requests generating, per model.",
                                    labels=["model"])
        generated = CounterMetricFamily("gpt_service_generated_tokens", "Completion tokens generated.",
                                        labels=["model"])
        for model in models:
            depth.add_metric([model["model_name"]], model["waiting"])
            running.add_metric([model["model_name"]], model["running"])
        for name, count in (inference.generated_tokens.items() if inference else []):
            generated.add_metric([name], count)
        yield from (depth, running, generated)
        yield from _engine_metrics(models)


def _engine_metrics(models: list[dict[str, Any]]) -> Iterator[Any]:
    """Each engine's KV cache and scheduler figures, once per base model (its adapters share them)."""
    labels = ["base_model", "dtype"]
    blocks = GaugeMetricFamily("gpt_service_kv_cache_blocks", "KV cache blocks in the pool.", labels=labels)
    free = GaugeMetricFamily("gpt_service_kv_cache_blocks_free", "KV cache blocks no request holds.", labels=labels)
    hit_rate = GaugeMetricFamily("gpt_service_prefix_cache_hit_rate",
                                 "Share of prompt tokens found in the prefix cache.", labels=labels)
    queried = CounterMetricFamily("gpt_service_prefix_cache_queried_tokens",
                                  "Prompt tokens looked up in the prefix cache.", labels=labels)
    hit = CounterMetricFamily("gpt_service_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.",
                              labels=labels)
    preempted = CounterMetricFamily("gpt_service_preemptions", "Requests preempted (computed again later) "
                                    "because the KV cache ran out.", labels=labels)
    seen = set()
    for model in models:
        key = (model["base_model"], model["dtype"])
        if key in seen:
            continue
        seen.add(key)
        stats = model["engine"]
        blocks.add_metric(key, stats["kv_blocks"])
        free.add_metric(key, stats["kv_blocks_free"])
        queried.add_metric(key, stats["prefix_queried_tokens"])
        hit.add_metric(key, stats["prefix_hit_tokens"])
        hit_rate.add_metric(key, stats["prefix_hit_tokens"] / max(1, stats["prefix_queried_tokens"]))
        preempted.add_metric(key, stats["preemptions"])
    yield from (blocks, free, hit_rate, queried, hit, preempted)


class _RequestMetrics:
    """ASGI middleware: count requests by route template, method and status, and time them."""

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram) -> None:
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.requests.labels(path, scope["method"], str(status)).inc()
            self.latency.labels(path).observe(time.perf_counter() - started)


def install_metrics(app: FastAPI) -> None:
    registry = CollectorRegistry()
    requests = Counter("gpt_service_http_requests", "HTTP requests.", ["route", "method", "status"],
                       registry=registry)
    latency = Histogram("gpt_service_http_request_seconds", "HTTP request latency.", ["route"], registry=registry)
    registry.register(_StateCollector(app))
    app.add_middleware(_RequestMetrics, requests=requests, latency=latency)

    @app.get("/metrics", tags=["service"], response_class=Response, responses={200: {
        "description": "Prometheus' text exposition format.",
        "content": {"text/plain": {"schema": {"type": "string"}}}}})
    def metrics(_request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
