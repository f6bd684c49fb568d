"""The operator's console: GET /ui (one static page, its script modules and style sheet, from service/ui/static) and
GET /ui/api/load (admin), the live load as compact JSON, and GET /ui/api/replicas (admin), every replica's view
(service/replicas.py).

The page and its assets hold no data, so they need no key (service.auth.required_scope opens /ui); the page asks for
the admin key, keeps it in the tab's sessionStorage and sends it as a bearer header to the admin and inference
routes, and to /ui/api/load. Every asset is local and no script is inline, so the Content-Security-Policy allows
'self' only.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response
from prometheus_client.core import Metric

from prefix_store.replicas import ReplicaRegistry

from ..auth import AdminAuth, required_scope
from ..metrics import KV_USAGE, PINNED, Metrics
from ..state import ServicesDep

STATIC = Path(__file__).resolve().parent.parent / "ui" / "static"
# The only files served, with their types: a fixed table, so no request path ever reaches the file system.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "plot.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on every load, so a server upgrade never runs an old script against a new API.
    "Cache-Control": "no-cache",
}
MAX_LOAD_TASKS = 50  # per-task rows in /ui/api/load: the busiest ones

router = APIRouter(prefix="/ui", include_in_schema=False)
api = APIRouter(prefix="/ui/api", tags=["console (admin)"], dependencies=[AdminAuth])


def _asset(name: str) -> Response:
    kind = ASSETS.get(name)
    if kind is None:
        raise HTTPException(404, f"no console asset {name!r}; there are {sorted(ASSETS)}")
    return Response((STATIC / name).read_bytes(), media_type=kind, headers=SECURITY_HEADERS)


@router.get("")
@router.get("/")
async def page() -> Response:
    return _asset("index.html")


@router.get("/static/{name}")
async def asset(name: str) -> Response:
    return _asset(name)


# The samples /ui/api/load reads: only these are collected, not every per-task histogram (see Metrics.exposition).
LOAD_SAMPLES = (
    "prefixserve_queue_depth",
    "prefixserve_running_requests",
    KV_USAGE,
    "prefixserve_requests_total",
    "prefixserve_generated_tokens_total",
    "prefixserve_batch_size_sum",
    "prefixserve_batch_size_count",
    "prefixserve_prefix_cache_hits_total",
    "prefixserve_prefix_cache_misses_total",
    "prefixserve_prefix_cache_resident_bytes",
    "prefixserve_task_version_requests_total",
    "prefixserve_task_requests_waiting",
    "prefixserve_task_requests_running",
    "prefixserve_task_resident",
    PINNED,
)


LOAD_EXAMPLE = {
    "time": 1764990000.0,
    "requests": 1520.0,
    "errors": 3.0,
    "tokens": 40210.0,
    "batch_rows": 9120.0,
    "batch_steps": 2210.0,
    "queue": 2.0,
    "running": 6.0,
    "kv_usage": 0.31,
    "cache": {"device": {"hits": 1490.0, "misses": 30.0, "resident_bytes": 1048576.0}},
    "tasks": {"sst2": {"requests": 800.0, "tokens": 0.0, "waiting": 1.0, "running": 2.0, "resident": 1.0}},
    "tasks_total": 1,
}


@api.get(
    "/load",
    summary="This replica's load now: gauges and cumulative counters (rates are the reader's)",
    description="requests and errors: inference requests since start; tokens: generated tokens; batch_rows / "
    "batch_steps: rows and engine steps (their ratio is the mean batch size); cache: per tier; tasks: the "
    f"{MAX_LOAD_TASKS} busiest tasks (waiting and running first, then by requests), tasks_total how many had any.",
    responses={200: {"content": {"application/json": {"example": LOAD_EXAMPLE}}}},
)
async def load(services: ServicesDep) -> dict[str, Any]:
    return await asyncio.to_thread(load_summary, services.metrics)


REPLICAS_EXAMPLE = {
    "replicas": [
        {
            "replica": "prefix-serve-7d9f-abcde:1",
            "backbone": "gpt2",
            "at": 1764990000.0,
            "queue": 2,
            "running": 6,
            "resident_tasks": 120,
            "pinned_tasks": 3,
            "resident": [2, 3],
            "pinned": 3,
        }
    ]
}


@api.get(
    "/replicas",
    summary="Every replica's view: load, and the versions of a task it holds resident and pinned",
    description="Each service replica announces its view every PREFIXSERVE_REPLICA_ANNOUNCE_S seconds; a replica "
    "silent for three periods is gone from the list. With `task`: its versions resident on each replica (`resident`) "
    "and the one pinned there (`pinned`, or null); always: how many tasks each holds resident and pinned.",
    responses={200: {"content": {"application/json": {"example": REPLICAS_EXAMPLE}}}},
)
async def replicas(
    services: ServicesDep,
    task: Annotated[str | None, Query(min_length=1, max_length=128, description="a task name")] = None,
) -> dict[str, Any]:
    views = await ReplicaRegistry(services.store.client, namespace=services.settings.namespace).views()
    out = []
    for v in views:
        resident, pinned = v.get("resident") or {}, v.get("pinned") or {}
        row = {k: v.get(k) for k in ("replica", "backbone", "at", "queue", "running")}
        row.update(resident_tasks=len(resident), pinned_tasks=len(pinned))
        if task is not None:
            row.update(resident=resident.get(task, []), pinned=pinned.get(task))
        out.append(row)
    return {"replicas": out}


def load_summary(metrics: Metrics) -> dict[str, Any]:
    """The same series as /metrics, read from the registry as numbers. Counters are totals since start: a reader
    takes differences between two reads for rates (requests/s, tokens/s, mean batch size, cache hit ratio)."""
    out: dict[str, Any] = {"time": time.time(), "requests": 0.0, "errors": 0.0, "tokens": 0.0}
    out.update(batch_rows=0.0, batch_steps=0.0)
    out.update(queue=0.0, running=0.0, kv_usage=0.0, cache={})
    tasks: dict[str, dict[str, float]] = {}

    def task(name: str) -> dict[str, float]:
        return tasks.setdefault(name, dict.fromkeys(("requests", "tokens", "waiting", "running", "resident"), 0.0))

    metric: Metric
    for metric in metrics.registry.restricted_registry(LOAD_SAMPLES).collect():
        for s in metric.samples:
            name, labels, value = s.name, s.labels, s.value
            if name == "prefixserve_queue_depth":
                out["queue"] = value
            elif name == "prefixserve_running_requests":
                out["running"] = value
            elif name == KV_USAGE:
                out["kv_usage"] = value
            elif name == "prefixserve_requests_total" and _inference_route(labels["route"]):
                out["requests"] += value  # inference routes only: not the console's own polling, nor uploads
                if int(labels["status"]) >= 400:
                    out["errors"] += value
            elif name == "prefixserve_batch_size_sum":
                out["batch_rows"] = value
            elif name == "prefixserve_batch_size_count":
                out["batch_steps"] = value
            elif name.startswith("prefixserve_prefix_cache_"):
                what = name.removeprefix("prefixserve_prefix_cache_").removesuffix("_total")
                out["cache"].setdefault(labels["tier"], {})[what] = value
            elif name == "prefixserve_generated_tokens_total":
                out["tokens"] += value
                task(labels["task"])["tokens"] += value
            elif name == "prefixserve_task_version_requests_total":
                task(labels["task"])["requests"] += value
            elif name == PINNED:
                task(labels["task"])["pinned"] = value
            elif name.startswith("prefixserve_task_"):
                task(labels["task"])[name.removeprefix("prefixserve_task_").removeprefix("requests_")] = value
    busiest = sorted(tasks.items(), key=lambda kv: (-kv[1]["waiting"] - kv[1]["running"], -kv[1]["requests"], kv[0]))
    out["tasks"] = dict(busiest[:MAX_LOAD_TASKS])
    out["tasks_total"] = len(tasks)
    return out


def _inference_route(route: str) -> bool:
    """A route template (as the requests counter labels it) that serves inference; "unmatched" is no route."""
    return route != "unmatched" and required_scope(route) == "inference"
