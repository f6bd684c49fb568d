"""Prometheus metrics, one registry per app (tests build many apps in one process)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prefix_store import PrefixStore

from .runtime import Scheduler

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def name_task(request: Any, name: str) -> None:
    """Records the task a request names. It becomes the request's `task` label only once `confirm_task` says the
    task exists; until then the label is "unknown", so unvalidated names never become label values (each value is
    a time series held forever)."""
    request.state.task_named = name


def confirm_task(request: Any) -> None:
    request.state.task = getattr(request.state, "task_named", "")


def _task_label(state: dict[str, Any]) -> str:
    if "task" in state:
        return state["task"]
    return "unknown" if state.get("task_named") else ""


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "prefixserve_requests", "HTTP requests by route, status and task", ["route", "status", "task"], registry=r
        )
        self.latency = Histogram(
            "prefixserve_request_latency_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "prefixserve_time_to_first_token_seconds",
            "submission to first token (or label)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "prefixserve_batch_size",
            "rows running in each engine step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.generated = Counter("prefixserve_generated_tokens", "generated tokens by task", ["task"], registry=r)

    def watch(self, scheduler: Scheduler, store: PrefixStore) -> None:
        """Registers gauges read at scrape time from the live scheduler, its caches and the store."""
        self.registry.register(_StateCollector(scheduler, store))
        scheduler.on_step = self.batch_size.observe

    def install(self, app: FastAPI) -> None:
        app.add_middleware(_CountRequests, metrics=self)


class _CountRequests:
    """Pure ASGI (not BaseHTTPMiddleware, which hides client disconnects from the routes): counts each request by
    route template, status and task (see name_task), and times it to its last byte."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            task = _task_label(scope.get("state", {}))
            self.metrics.requests.labels(route, str(status), task).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


class _StateCollector:
    def __init__(self, scheduler: Scheduler, store: PrefixStore) -> None:
        self.scheduler = scheduler
        self.store = store

    def collect(self) -> Iterator[Metric]:
        sched = self.scheduler
        yield GaugeMetricFamily("prefixserve_queue_depth", "requests waiting for admission", value=sched.queue_depth)
        yield GaugeMetricFamily("prefixserve_running_requests", "requests decoding", value=sched.running)
        tiers = {"device": sched.engine.device_cache, "host": sched.host_cache.lru}
        for name, help_text in (
            ("hits", "lookups served"),
            ("misses", "lookups that went a tier down"),
            ("evictions", "entries evicted by the byte budget"),
        ):
            fam = CounterMetricFamily(f"prefixserve_prefix_cache_{name}", f"prefix cache {help_text}", labels=["tier"])
            for tier, lru in tiers.items():
                fam.add_metric([tier], lru.stats[name])
            yield fam
        yield CounterMetricFamily(
            "prefixserve_store_decode_failures",
            "stored prefix versions that failed to decode (a server-side fault, answered 500)",
            value=self.store.decode_failures,
        )
        resident = GaugeMetricFamily("prefixserve_prefix_cache_resident_bytes", "bytes held", labels=["tier"])
        for tier, lru in tiers.items():
            resident.add_metric([tier], lru.resident_bytes)
        yield resident
