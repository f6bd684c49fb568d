"""The host side of the tiered prefix cache: task -> current version, and (task, version) -> artifact in host
memory, bounded by bytes, in front of Redis. The device tier is the engine's (`engine.DeviceCache`).

Versions are immutable and their numbers never reused, so a cached (task, version) entry is never stale; only the
task -> current-version map can be, and store events keep it fresh. When the event subscription drops, the map is
cleared: pub/sub does not replay what was missed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prefix_store import PrefixArtifact, PrefixStore, StoreEvent, StoreUnavailable, VersionKey

from .lru import ByteLRU

log = logging.getLogger(__name__)


class HostCache:
    """Args:
    store: the Redis prefix store.
    capacity_bytes: host-memory budget for artifacts.
    on_invalidate: told (task, version or None for every version) when entries must leave lower tiers too.
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

    async def _load(self, key: VersionKey) -> PrefixArtifact:
        artifact = await self.store.get(*key)
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
            self._drop(ev.task, None)
            return
        if ev.current is not None:
            self.current[ev.task] = ev.current
        else:
            self.current.pop(ev.task, None)
        if ev.type == "delete_version" and ev.version is not None:
            self._drop(ev.task, ev.version)

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
        self._epoch += 1
        self.subscribed.set()

    def _stamp(self, task: str) -> tuple[int, int]:
        return self._epoch, self._generation.get(task, 0)
