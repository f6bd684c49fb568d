"""The host side of the tiered prefix cache: task -> current version, and (task, version) -> artifact in host
memory, bounded by bytes, in front of Redis. The device tier is the engine's (`engine.DeviceCache`).

Versions are immutable and their numbers never reused, so a cached (task, version) entry is never stale; only the
task -> current-version map and the task -> traffic-split map can be, and store events keep them fresh. When the
event subscription drops, both are cleared: pub/sub does not replay what was missed.

A traffic split sends each unpinned request to one of the versions it names, by weight: `choose` takes a draw in
[0, 1) (the service hashes the request id into it, so a retry with the same id lands on the same version) and walks
the cumulative weights in version order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from prefix_store import PrefixArtifact, PrefixStore, StoreEvent, StoreUnavailable, VersionKey

from .lru import ByteLRU

log = logging.getLogger(__name__)


class HostCache:
    """Args:
    store: the Redis prefix store.
    capacity_bytes: host-memory budget for artifacts.
    on_invalidate: told (task, version or None for every version) when entries must leave lower tiers too.

    `on_event` is told every store event once this tier has applied it, and `on_subscribed` every (re)subscription
    (anything may have changed while unsubscribed): the warm set (warm.py) follows pins through them. `observers` are
    told every event after it (the metrics drop the series of deleted tasks and of versions no longer routed to).
    """

    def __init__(
        self,
        store: PrefixStore,
        *,
        capacity_bytes: int = 4 * 1024**3,
        on_invalidate: Callable[[str, int | None], None] | None = None,
    ) -> None:
        self.store = store
        self.on_invalidate = on_invalidate or (lambda task, version: None)
        self.current: dict[str, int] = {}
        # task -> its traffic split ({version: weight}; None: none), for the tasks whose split is known here
        self.traffic: dict[str, dict[int, int] | None] = {}
        self.on_event: Callable[[StoreEvent], None] | None = None
        self.on_subscribed: Callable[[], None] | None = None
        self.observers: list[Callable[[StoreEvent], None]] = []
        self.on_load: Callable[[str, float], None] | None = None  # told (task, seconds) of each Redis read (metrics)
        self.lru: ByteLRU[VersionKey, PrefixArtifact] = ByteLRU(capacity_bytes, lambda a: a.nbytes)
        self._generation: dict[str, int] = {}  # bumped by every event of a task, to discard racing lookups
        self._epoch = 0  # bumped by every (re)subscription
        self._loading: dict[VersionKey, asyncio.Future[PrefixArtifact]] = {}
        self._listener: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    async def get(self, task: str, version: int | None = None) -> PrefixArtifact:
        """The artifact of a task's current (or given) version. Raises TaskNotFound / VersionNotFound /
        StoreUnavailable. Concurrent misses of one key share one Redis read."""
        if version is None:
            version = await self.current_version(task)
        key: VersionKey = (task, version)
        hit = self.lru.get(key)
        if hit is not None:
            return hit
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._load(key))
            self._loading[key] = pending
            pending.add_done_callback(lambda _: self._loading.pop(key, None))
        return await asyncio.shield(pending)

    def peek(self, task: str, version: int | None = None) -> PrefixArtifact | None:
        """The artifact when this tier already holds it (and knows the task's current version), without waiting;
        None otherwise (get() then reads it)."""
        if version is None:
            version = self.current.get(task)
            if version is None:
                return None
        return self.lru.get((task, version))

    async def current_version(self, task: str) -> int:
        v = self.current.get(task)
        if v is not None:
            return v
        stamp = self._stamp(task)
        v = await self.store.current_version(task)
        if self._stamp(task) == stamp:  # no event moved the task (and no resubscribe) while we were reading
            self.current[task] = v
        return v

    async def route(self, task: str) -> tuple[int, dict[int, int] | None]:
        """The task's current version and its traffic split (None: none): from this tier when both are known, else
        from one store read (cached unless an event moved the task meanwhile). Raises TaskNotFound."""
        v = self.current.get(task)
        if v is not None and task in self.traffic:
            return v, self.traffic[task]
        stamp = self._stamp(task)
        found = await self.store.routing(task)
        if self._stamp(task) == stamp:
            self.current[task] = found.current
            self.traffic[task] = found.traffic
        return found.current, found.traffic

    def forget_route(self, task: str) -> None:
        """Forgets the task's current version and split, so the next `route` reads them from the store: for a caller
        that found what this tier knew stale (a split naming a version deleted since, its event not heard yet).
        Lookups in flight discard what they read, as after an event."""
        self._generation[task] = self._generation.get(task, 0) + 1
        self.current.pop(task, None)
        self.traffic.pop(task, None)

    async def choose(self, task: str, draw: float) -> int | None:
        """The version an unpinned request of the task runs under its traffic split: the one `draw` (uniform in
        [0, 1)) falls on; None when the task has no split (its current version: `get(task)`)."""
        _, split = await self.route(task)
        return pick(split, draw) if split else None

    async def _load(self, key: VersionKey) -> PrefixArtifact:
        start = time.perf_counter()
        artifact = await self.store.get(*key)
        if self.on_load is not None:
            self.on_load(key[0], time.perf_counter() - start)
        self.lru.put(key, artifact)
        return artifact

    def _drop(self, task: str, version: int | None) -> None:
        self.lru.drop(lambda k: k[0] == task and (version is None or k[1] == version))
        self.on_invalidate(task, version)

    # -- events -------------------------------------------------------------------------------------------------
    def apply(self, ev: StoreEvent) -> None:
        self._generation[ev.task] = self._generation.get(ev.task, 0) + 1
        if ev.type == "delete":
            self.current.pop(ev.task, None)
            self.traffic.pop(ev.task, None)
            self._drop(ev.task, None)
        else:
            if ev.current is not None:
                self.current[ev.task] = ev.current
            else:
                self.current.pop(ev.task, None)
            if ev.type == "traffic":
                self.traffic[ev.task] = None if ev.traffic is None else {int(v): w for v, w in ev.traffic.items()}
            elif ev.type == "rollback":  # the store cleared the split with it
                self.traffic[ev.task] = None
            if ev.type == "delete_version" and ev.version is not None:
                self._drop(ev.task, ev.version)
        if self.on_event is not None:
            self.on_event(ev)
        for observe in self.observers:
            observe(ev)

    def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="prefix-cache-events")

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)

    async def _listen(self) -> None:
        delay = 0.1
        while True:
            try:
                async for ev in self.store.events(on_subscribed=self._on_subscribed):
                    self.apply(ev)
                    delay = 0.1
            except StoreUnavailable as e:
                self.subscribed.clear()
                log.warning("prefix events unavailable (%s); retrying in %.1fs", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _on_subscribed(self) -> None:
        # Events missed while unsubscribed could have moved any task: forget every current version, and make
        # lookups already in flight discard what they read.
        self.current.clear()
        self.traffic.clear()
        self._epoch += 1
        self.subscribed.set()
        if self.on_subscribed is not None:
            self.on_subscribed()

    def _stamp(self, task: str) -> tuple[int, int]:
        return self._epoch, self._generation.get(task, 0)


def pick(split: Mapping[int, int], draw: float) -> int:
    """The version of a traffic split ({version: weight}, weights summing above 0) that `draw` in [0, 1) falls on:
    the versions in ascending order, each owning a share of [0, 1) in proportion to its weight (weight 0: none)."""
    total = sum(split.values())
    at = draw * total
    chosen = 0
    for version in sorted(split):
        weight = split[version]
        if weight <= 0:
            continue
        chosen = version
        if at < weight:
            break
        at -= weight
    return chosen  # the last weighted version when rounding put `at` past the end
