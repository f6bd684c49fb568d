"""The host tier in front of the store: store events move each task's current version and drop the versions that
leave (telling the lower tiers), a resubscription forgets every current version, a cached version is served without
a store read, the byte budget evicts least recently used first; with the real store (Redis): concurrent misses share
one read, and a lookup raced by an event does not cache what it read."""

from __future__ import annotations

import asyncio

import pytest

from prefix_store import StoreEvent
from service.runtime import HostCache
from tests.factories import make_artifact


def art(task: str, version: int, P: int = 4):
    a = make_artifact(task, "p_tuning_v2", P=P, seed=version)
    a.version = version
    return a


def cache_with(*arts, capacity: int = 1 << 30) -> tuple[HostCache, list]:
    """A host cache with no store behind it (a read would fail): the artifacts cached, the invalidations recorded."""
    told: list = []
    cache = HostCache(None, capacity_bytes=capacity, on_invalidate=lambda task, version: told.append((task, version)))
    for a in arts:
        cache.lru.put(a.key, a)
    return cache, told


def test_events_move_current_versions_and_drop_the_versions_that_leave():
    cache, told = cache_with(art("t", 1), art("t", 2), art("u", 1))
    cache.apply(StoreEvent("publish", "t", 2, current=2))
    cache.apply(StoreEvent("publish", "u", 1, current=1))
    assert cache.current == {"t": 2, "u": 1} and told == [], "a publish leaves every cached version valid"
    cache.apply(StoreEvent("rollback", "t", 1, current=1))
    assert cache.current["t"] == 1 and ("t", 2) in cache.lru and told == []
    cache.apply(StoreEvent("delete_version", "t", 2, current=1))
    assert ("t", 2) not in cache.lru and ("t", 1) in cache.lru and told == [("t", 2)]
    cache.apply(StoreEvent("delete", "t"))
    assert "t" not in cache.current and ("t", 1) not in cache.lru and told == [("t", 2), ("t", None)]
    assert list(cache.lru.entries) == [("u", 1)] and cache.current == {"u": 1}
    cache.apply(StoreEvent("delete_version", "u", 1, current=None))  # its last version: no current one
    assert cache.current == {} and told[-1] == ("u", 1)


async def test_a_cached_version_is_served_without_a_store_read():
    a = art("t", 3)
    cache, _ = cache_with(a)
    cache.apply(StoreEvent("publish", "t", 3, current=3))
    assert await cache.get("t") is a and await cache.get("t", 3) is a
    assert cache.lru.stats["hits"] == 2 and cache.lru.stats["misses"] == 0
    with pytest.raises(AttributeError):  # the control: anything not cached goes to the (absent) store
        await cache.get("t", 2)


def test_the_byte_budget_evicts_the_least_recently_used_first():
    a, b, c = art("a", 1), art("b", 1), art("c", 1)
    cache, _ = cache_with(capacity=2 * a.nbytes + a.nbytes // 2)
    cache.lru.put(a.key, a)
    cache.lru.put(b.key, b)
    assert cache.lru.get(a.key) is a  # a is now the most recently used
    cache.lru.put(c.key, c)
    assert list(cache.lru.entries) == [("a", 1), ("c", 1)] and cache.lru.stats["evictions"] == 1
    assert cache.lru.resident_bytes == 2 * a.nbytes <= cache.lru.capacity


def test_a_resubscription_forgets_every_current_version():
    cache, told = cache_with(art("t", 1))
    cache.apply(StoreEvent("publish", "t", 1, current=1))
    stamp = cache._stamp("t")
    cache._on_subscribed()
    assert cache.current == {} and cache.subscribed.is_set() and cache._stamp("t") != stamp
    assert ("t", 1) in cache.lru and told == [], "versions never change: the cached ones stay"


# -- with the real store ----------------------------------------------------------------------------------------------
async def test_concurrent_misses_of_one_version_share_one_store_read(store, monkeypatch):
    published = await store.put(make_artifact("t", "p_tuning_v2", P=3))
    cache = HostCache(store)
    reads = []
    real = store.get

    async def counted(task, version):
        reads.append((task, version))
        await asyncio.sleep(0.05)  # the others arrive while the first read is in flight
        return await real(task, version)

    monkeypatch.setattr(store, "get", counted)
    got = await asyncio.gather(*(cache.get("t", published.version) for _ in range(5)))
    assert reads == [("t", published.version)]
    assert all(g is got[0] for g in got) and got[0].key == published.key
    assert await cache.get("t") is got[0] and reads == [("t", 1)], "then a hit, the current version read once"


async def test_a_current_version_read_while_an_event_moves_the_task_is_not_cached(store, monkeypatch):
    await store.put(make_artifact("t", "p_tuning_v2", P=3))
    cache = HostCache(store)
    real = store.current_version

    async def raced(task):
        v = await real(task)
        cache.apply(StoreEvent("publish", task, 2, current=2))  # an event lands while the read was in flight
        cache.current.pop(task)  # ... and, say, a resubscription forgot it again
        return v

    monkeypatch.setattr(store, "current_version", raced)
    assert await cache.current_version("t") == 1, "the caller gets what it read"
    assert "t" not in cache.current, "but it is not cached: it may already be stale"
    monkeypatch.setattr(store, "current_version", real)
    assert await cache.current_version("t") == 1 and cache.current == {"t": 1}, "an unraced read is cached"
