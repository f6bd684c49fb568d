"""Prometheus metrics, one registry per app (tests build many apps in one process).

Two kinds: counters and histograms updated as requests pass (the middleware, the routes' `Call`, the caches' load
hooks), and gauges read at scrape time from the live scheduler, engine and caches (the collectors below), so that
nothing is kept up to date between scrapes and a scrape costs one pass over the live requests and the device cache.

The gauges an inference gateway routes by (Kubernetes' Gateway API Inference Extension, whose endpoint picker reads
vLLM's `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` and `vllm:lora_requests_info`, or any names its
configuration maps) are `prefixserve:num_requests_waiting`, `prefixserve:num_requests_running`,
`prefixserve:kv_cache_usage_perc` and `prefixserve:lora_requests_info`, with vLLM's semantics (see _GatewayCollector);
deploy/k8s/inference-gateway maps them.

Task label values are always the names of stored tasks (or "base", the bare backbone): a name becomes a label only
once the store has answered for it (see name_task, serving_task and the collectors), and a task's series are removed
when it is deleted (Metrics.forget_task, on its `delete` store event). Version label values are bounded the same way:
a version is its own value only while it is the task's current version or named by its traffic split, else "other",
and a version's series are removed once it is neither (Metrics.version_label, Metrics.on_store_event).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Histogram, Summary, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prefix_store import PrefixStore, StoreEvent, VersionKey

from .runtime import Scheduler
from .runtime.engine import DeviceCache
from .runtime.host_cache import HostCache
from .runtime.kv_cache import BLOCK, PrefixPool
from .runtime.runner import DevicePrefix

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Per-task histograms are coarser: their series are multiplied by the number of tasks that have served traffic.
TASK_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)

# The names an inference gateway's endpoint picker is configured with (deploy/k8s/inference-gateway/epp.yaml).
NUM_WAITING = "prefixserve:num_requests_waiting"
NUM_RUNNING = "prefixserve:num_requests_running"
KV_USAGE = "prefixserve:kv_cache_usage_perc"
LORA_INFO = "prefixserve:lora_requests_info"

T = TypeVar("T")


def name_task(request: Any, name: str) -> None:
    """Records the task a request names. It becomes the request's `task` label only once `confirm_task` says the
    task exists; until then the label is "unknown", so unvalidated names never become label values (each value is
    a time series held forever)."""
    request.state.task_named = name


def confirm_task(request: Any) -> None:
    request.state.task = getattr(request.state, "task_named", "")


def serving_task(request: Any, task: str) -> None:
    """Records the task an inference request runs once its version is resolved: the stored task's own name (never
    the body's spelling of it), or "base" for the bare backbone. It labels the request's per-task latency and time
    to first token."""
    request.state.serving_task = task


def task_deleted(request: Any) -> None:
    """Marks a request that deleted its task: the task's series go once the request itself is counted (its store
    event, which removes them on every replica, may come before or after)."""
    request.state.task_deleted = True


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
        # Per task: a task's series appear with its first request (or load) and stay until it is deleted, 36 of them
        # (15 + 15 + 2 x 3) for a task served at one version, about 0.3 ms of every full scrape; each other version
        # its traffic split names adds 30 (the two histograms), and requests of any other version share "other".
        self.task_latency = Histogram(
            "prefixserve_task_request_latency_seconds",
            "successful inference requests by task (base: the bare backbone) and version (its number while current "
            "or named by the task's traffic split, else other; empty for base), arrival to last byte sent",
            ["task", "version"],
            buckets=TASK_BUCKETS,
            registry=r,
        )
        self.task_ttft = Histogram(
            "prefixserve_task_time_to_first_token_seconds",
            "submission to first token (or label) by task (base: the bare backbone) and version (as for "
            "prefixserve_task_request_latency_seconds)",
            ["task", "version"],
            buckets=TASK_BUCKETS,
            registry=r,
        )
        self.version_requests = Counter(
            "prefixserve_task_version_requests",
            "inference requests that ran a task version, by task, version (its number while current or named by the "
            "task's traffic split, else other) and status: a canary's share of traffic and of errors",
            ["task", "version", "status"],
            registry=r,
        )
        # Loads are rare (a cache miss each): their count and total time, not a histogram.
        self.task_load = Summary(
            "prefixserve_task_load_seconds",
            "prefix loads by task and stage: fetch = read from Redis and decoded into host memory (a host-cache "
            "miss), device = copied into the device prefix pool for a request (a device-cache miss)",
            ["task", "stage"],
            registry=r,
        )
        self.routing: HostCache | None = None  # the task versions the version labels name (set by `watch`)
        # task -> the label sets of its series whose labels vary beyond the task (route, status, version), so that
        # they can be removed (prometheus_client keeps every label set until `remove`); any thread adds to it
        self._series: dict[str, set[tuple[Counter | Histogram, tuple[str, ...]]]] = {}
        self._series_lock = threading.Lock()

    def watch(self, scheduler: Scheduler, store: PrefixStore, pinned: Callable[[], set[str]] | None = None) -> None:
        """Registers the gauges read at scrape time from the live scheduler, its caches and the store, hooks the
        two caches' loads (the device's runs on the engine's thread: Histogram.observe takes its own lock), and
        follows the store's events (series of deleted tasks and of versions no longer routed to go). `pinned`: the
        tasks pinned in the store, as this replica heard (WarmSet.pinned), for the per-task pinned gauge."""
        self.registry.register(_StateCollector(scheduler, store))
        self.registry.register(_GatewayCollector(scheduler, pinned))
        self.routing = scheduler.host_cache
        scheduler.host_cache.observers.append(self.on_store_event)
        scheduler.on_step = self.batch_size.observe
        scheduler.host_cache.on_load = lambda task, seconds: self.task_load.labels(task, "fetch").observe(seconds)
        scheduler.engine.device_cache.on_load = lambda task, s: self.task_load.labels(task, "device").observe(s)

    def exposition(self, names: Sequence[str] = ()) -> bytes:
        """The text exposition: every series, or only the samples named in `names` (the `name[]` query parameters,
        as prometheus_client's own handlers take them; a histogram's are its `_bucket`, `_count`, ... samples). An
        endpoint picker scraping every 100 ms asks for the four gateway gauges (0.4 ms), whose cost does not grow
        with the per-task series (a full scrape with 1,000 tasks that served traffic writes 36,000 of them, about
        0.35 s on the development machine). Safe from any thread: see the collectors."""
        return generate_latest(self.registry.restricted_registry(names) if names else self.registry)

    async def render(self, names: Sequence[str] = ()) -> bytes:
        """`exposition` on a worker thread, so a full scrape of many tasks' series does not stall the event loop
        (it still takes the GIL in turns with it)."""
        return await asyncio.to_thread(self.exposition, names)

    def first_output(self, request: Any, latency: float) -> None:
        """A request's time to first token (or label), overall and for the task version it runs."""
        self.ttft.observe(latency)
        task = getattr(request.state, "serving_task", None)
        if task is not None:
            version = self.version_label(task, getattr(request.state, "version", None))
            self.series(self.task_ttft, task, task, version).observe(latency)

    def version_label(self, task: str, version: int | None) -> str:
        """A served version's label value: its number while it is the task's current version or named by its
        traffic split, as this replica's host tier knows them (so at most 17 numbers per task, and only those a
        canary compares), else "other" (a `task@N` of an older version); "" for the bare backbone."""
        if version is None:
            return ""
        routing = self.routing
        if routing is not None:
            split = routing.traffic.get(task)
            if version == routing.current.get(task) or (split is not None and version in split):
                return str(version)
        return "other"

    def series(self, metric: Any, task: str, *labels: str) -> Any:
        """metric.labels(*labels), the label set noted for the task, so that it can be removed (`forget_task`)."""
        with self._series_lock:
            self._series.setdefault(task, set()).add((metric, labels))
        return metric.labels(*labels)

    def on_store_event(self, ev: StoreEvent) -> None:
        """A deleted task's series go; after an event that moves the task's current version or split, so do those
        of its versions no longer routed to (the split is known here once a request was routed by it)."""
        if ev.type == "delete":
            self.forget_task(ev.task)
        elif ev.type in ("publish", "rollback", "traffic", "delete_version") and self.routing is not None:
            routing = self.routing
            if ev.task not in routing.current or ev.task not in routing.traffic:  # nothing to tell stale ones by
                return
            routed = {str(routing.current[ev.task]), *(str(v) for v in routing.traffic[ev.task] or ())}
            versioned = (self.task_latency, self.task_ttft, self.version_requests)
            self._remove(ev.task, lambda m, labels: m in versioned and labels[1] not in (*routed, "other", ""))

    def forget_task(self, task: str) -> None:
        """Removes every series of the task (a deleted one: its name may never come back)."""
        self._remove(task, lambda m, labels: True)
        for metric, labels in ((self.generated, (task,)), *((self.task_load, (task, s)) for s in ("fetch", "device"))):
            with contextlib.suppress(KeyError):  # never labelled so
                metric.remove(*labels)

    def _remove(self, task: str, stale: Callable[[Any, tuple[str, ...]], bool]) -> None:
        with self._series_lock:
            noted = self._series.get(task, set())
            gone = {(m, labels) for m, labels in noted if stale(m, labels)}
            noted -= gone
            if not noted:
                self._series.pop(task, None)
        for metric, labels in gone:
            with contextlib.suppress(KeyError):
                metric.remove(*labels)

    def install(self, app: FastAPI) -> None:
        app.add_middleware(_CountRequests, metrics=self)


class _CountRequests:
    """Pure ASGI (not BaseHTTPMiddleware, which hides client disconnects from the routes): counts each request by
    route template, status and task (see name_task), and times it to its last byte; an inference request that
    succeeded is timed for its task too (see serving_task)."""

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
            elapsed = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", "unmatched")
            state = scope.get("state", {})
            metrics = self.metrics
            task = _task_label(state)
            metrics.series(metrics.requests, task, route, str(status), task).inc()
            metrics.latency.labels(route).observe(elapsed)
            serving, served = state.get("serving_task"), state.get("version")
            if serving is not None:
                version = metrics.version_label(serving, served)
                if status < 400:
                    metrics.series(metrics.task_latency, serving, serving, version).observe(elapsed)
                if served is not None:
                    metrics.series(metrics.version_requests, serving, serving, version, str(status)).inc()
            if state.get("task_deleted"):  # after its own count: the deleting request's series go with the task's
                metrics.forget_task(task)


class _StateCollector:
    def __init__(self, scheduler: Scheduler, store: PrefixStore) -> None:
        self.scheduler = scheduler
        self.store = store

    def describe(self) -> Iterator[Metric]:
        """The families' names, without reading any state: without them a scrape restricted to some samples (see
        Metrics.exposition, /ui/api/load) would never collect these."""
        yield GaugeMetricFamily("prefixserve_queue_depth", "")
        yield GaugeMetricFamily("prefixserve_running_requests", "")
        for name in ("hits", "misses", "evictions"):
            yield CounterMetricFamily(f"prefixserve_prefix_cache_{name}", "")
        yield CounterMetricFamily("prefixserve_store_decode_failures", "")
        yield GaugeMetricFamily("prefixserve_prefix_cache_resident_bytes", "")

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


KV_USAGE_HELP = (
    "fraction of the engine's key/value memory in use, 0 to 1: (key/value columns of the device prefix pool held "
    "by waiting or running requests or pinned + columns reserved by running rows, prefix + prompt + max new "
    "tokens) / (the pool's budget, PREFIXSERVE_DEVICE_CACHE_BYTES, in columns + PREFIXSERVE_MAX_BATCH_TOKENS); a "
    "column is one token's keys and values of every layer. Cached prefixes nobody holds are evictable and count "
    "as free (vLLM counts its cached free blocks so); encoders keep no row key/values between steps: pool only"
)
LORA_INFO_HELP = (
    "the tasks (adapters) of this replica's requests, vLLM's lora_requests_info: running_lora_adapters = tasks of "
    "running requests, waiting_lora_adapters = tasks of requests waiting for admission (comma-separated, sorted; "
    "base requests are not listed), max_lora = most distinct tasks one step can hold (one task per row, "
    "PREFIXSERVE_MAX_BATCH_SIZE, and every running task's prefix resident at once: the prefix pool's budget over "
    "its longest resident prefix); value: the time these were read (unix seconds). One series, the current one"
)


PINNED = "prefixserve_task_pinned"
PINNED_HELP = (
    "pinned tasks (pinned in the store, as this replica heard, or here): 1 when this replica holds the task's current "
    "version pinned resident, 0 when it does not (no room for it yet, past this replica's pin budget, or the pin "
    "still on an older version)"
)
_ONLY = "(tasks queued, running or resident here only)"
PER_TASK = {
    "requests_waiting": f"requests of the task waiting for admission {_ONLY}",
    "requests_running": f"requests of the task admitted to the engine {_ONLY}",
    "resident": f"1 when the task's current version is in this replica's device prefix cache {_ONLY}",
}


class _GatewayCollector:
    """The gauges an inference gateway routes by, with the semantics of vLLM's, and the per-task gauges.

    Per-task series are exported only for tasks that matter now: those with requests waiting or running on this
    replica, or with a version resident in its device prefix cache. So their number is bounded by the queue, the
    batch and the device budget, not by the number of tasks in the store (thousands), and a task drops out once it
    is idle and evicted (Prometheus then marks its series stale).

    The scrape runs on a worker thread (Metrics.render), while the event loop changes the scheduler's state and the
    engine's thread the device cache's: every dict is copied whole before it is iterated (one C call under the GIL;
    iterating a dict another thread resizes would raise), single values are read once, nothing is written.
    """

    NAMES = (NUM_WAITING, NUM_RUNNING, KV_USAGE, LORA_INFO, *(f"prefixserve_task_{n}" for n in PER_TASK), PINNED)

    def __init__(self, scheduler: Scheduler, pinned: Callable[[], set[str]] | None = None) -> None:
        self.scheduler = scheduler
        self.pinned = pinned

    def describe(self) -> Iterator[Metric]:
        """The families' names, without reading any state: what lets a scrape restricted to some of them (see
        Metrics.exposition) find this collector."""
        for name in self.NAMES:
            yield GaugeMetricFamily(name, "")

    def collect(self) -> Iterator[Metric]:
        sched = self.scheduler
        cache = sched.engine.device_cache
        entries: dict[VersionKey, DevicePrefix] = dict(snapshot(lambda: list(cache.entries.items())))
        in_use = {key for key, holders in snapshot(lambda: list(cache.holders.items())) if holders}
        in_use.update(key for _, key in snapshot(lambda: list(cache.pins.items())))
        waiting, running = sched.task_requests()

        yield GaugeMetricFamily(
            NUM_WAITING,
            "requests waiting for admission (queued, their task being looked up or loaded), vLLM's "
            "num_requests_waiting",
            value=sched.queue_depth,
        )
        yield GaugeMetricFamily(
            NUM_RUNNING,
            "requests in the running batch after the last engine step, vLLM's num_requests_running",
            value=sched.running,
        )
        yield GaugeMetricFamily(KV_USAGE, KV_USAGE_HELP, value=self._kv_usage(entries, in_use))
        info = GaugeMetricFamily(
            LORA_INFO,
            LORA_INFO_HELP,
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        # vLLM leaves a series behind per label set it ever reported, each valued with the time it was last set,
        # and readers take the newest; the current one alone says the same without growing.
        labels = [str(self._max_lora(entries)), ",".join(sorted(running)), ",".join(sorted(waiting))]
        info.add_metric(labels, time.time())
        yield info

        resident = self._resident(entries)
        tasks = sorted(set(waiting) | set(running) | set(resident))
        values = {"requests_waiting": waiting, "requests_running": running, "resident": resident}
        for key, help_text in PER_TASK.items():
            fam = GaugeMetricFamily(f"prefixserve_task_{key}", help_text, labels=["task"])
            for task in tasks:
                fam.add_metric([task], values[key].get(task, 0))
            yield fam
        yield self._pins(cache)

    def _pins(self, cache: DeviceCache) -> GaugeMetricFamily:
        """See PINNED_HELP: a pin stored but not held here (yet, or past this replica's budget) reads 0, a pin that
        lags the current version too (its new version waits for room)."""
        here = {task: key[1] for task, key in snapshot(lambda: list(cache.pins.items()))}
        stored = set(self.pinned()) if self.pinned is not None else set()
        current = self.scheduler.host_cache.current
        fam = GaugeMetricFamily(PINNED, PINNED_HELP, labels=["task"])
        for task in sorted(stored | set(here)):
            v, want = here.get(task), current.get(task)
            fam.add_metric([task], int(v is not None and (want is None or v == want)))
        return fam

    def _kv_usage(self, entries: dict[VersionKey, DevicePrefix], in_use: set[VersionKey]) -> float:
        """See KV_USAGE_HELP. Counted in columns: a pool position and a slot position hold the same bytes (a
        sliding-window layer's ring holds fewer; its rows are counted as if it kept every token)."""
        sched = self.scheduler
        engine = sched.engine
        pool = engine.pool
        used = sum(_pool_columns(entries[key]) for key in in_use if key in entries)
        capacity = pool.max_blocks * BLOCK
        if engine.cache is not None:  # causal LMs: rows keep their own key/values in the slot cache
            used += sched.reserved_tokens
            capacity += sched.max_batch_tokens
        return min(1.0, used / capacity) if capacity else 0.0

    def _max_lora(self, entries: dict[VersionKey, DevicePrefix]) -> int:
        """The most distinct tasks one step can hold: a row runs one task, and every task of a step has its prefix
        held in the pool at once. The pool's share depends on prefix lengths, so it is taken for the longest prefix
        resident now (none resident: the rows alone)."""
        sched = self.scheduler
        longest = max((e.num_virtual_tokens for e in entries.values() if e.index is not None), default=0)
        if not longest:
            return sched.max_batch_size
        fits = sched.engine.pool.max_blocks // PrefixPool.blocks_for(longest)
        return max(1, min(sched.max_batch_size, fits))

    def _resident(self, entries: dict[VersionKey, DevicePrefix]) -> dict[str, int]:
        """task -> 1 when its current version is resident, 0 when only another version is. The current version is
        the one this replica's host tier knows (store events keep it); a task it has not looked up since its last
        (re)subscription, when events may have been missed, counts as resident if any version is."""
        versions: dict[str, list[int]] = {}
        for task, version in entries:
            versions.setdefault(task, []).append(version)
        current = self.scheduler.host_cache.current
        out = {}
        for task, vs in versions.items():
            v = current.get(task)
            out[task] = int(v in vs) if v is not None else 1
        return out


def _pool_columns(entry: DevicePrefix) -> int:
    """The pool positions an entry holds: its prefix's whole blocks (none for a prefix without key/values)."""
    return 0 if entry.index is None else PrefixPool.blocks_for(entry.num_virtual_tokens) * BLOCK


def snapshot(read: Callable[[], T]) -> T:
    """`read` (a copy of a dict the engine's thread changes) again while it races a resize, which it seldom does:
    a step changes these dicts a few times at most."""
    for _ in range(9):
        try:
            return read()
        except RuntimeError:  # "changed size during iteration"
            continue
    return read()
