"""Traffic splits and pins as the store keeps them (real Redis): written by one atomic script that checks every
version it names and publishes an event, read back in one round trip, interacting with version deletes (refused
while the split names the version), rollbacks (which clear the split) and task deletes (which drop both)."""

import asyncio

import pytest

from prefix_store import StoreEvent, TaskNotFound, VersionConflict, VersionNotFound
from prefix_store.store import Routing
from tests.factories import make_artifact

pytestmark = pytest.mark.redis


async def _events(store, n: int, action) -> list[StoreEvent]:
    """The first n events published while `action` runs."""
    got: list[StoreEvent] = []
    subscribed = asyncio.Event()

    async def listen():
        async for ev in store.events(on_subscribed=subscribed.set):
            got.append(ev)
            if len(got) == n:
                return

    listener = asyncio.create_task(listen())
    await asyncio.wait_for(subscribed.wait(), 5)
    await action()
    await asyncio.wait_for(listener, 5)
    return got


async def test_a_split_is_checked_stored_and_announced(store):
    for fill in (1.0, 2.0, 3.0):
        await store.put(make_artifact("t", fill=fill))
    assert (await store.routing("t")).traffic is None

    events = await _events(store, 1, lambda: store.set_traffic("t", {1: 90, 3: 10}))
    assert events == [StoreEvent("traffic", "t", current=3, traffic={"1": 90, "3": 10})]
    routing = await store.routing("t")
    assert routing.current == 3 and routing.traffic == {1: 90, 3: 10} and not routing.pinned

    with pytest.raises(VersionNotFound, match=r"task 't' has no versions 7, 9: a traffic split"):
        await store.set_traffic("t", {1: 1, 7: 1, 9: 1})
    with pytest.raises(TaskNotFound, match="'nope'"):
        await store.set_traffic("nope", {1: 1})
    for bad in ({}, {1: 0}, {0: 1}, {1: -1}, {v: 1 for v in range(1, 18)}, {1: 10**7}):
        with pytest.raises(ValueError):
            await store.set_traffic("t", bad)
    assert (await store.routing("t")).traffic == {1: 90, 3: 10}, "a refused split changes nothing"

    events = await _events(store, 1, lambda: store.set_traffic("t", None))
    assert events == [StoreEvent("traffic", "t", current=3, traffic=None)]
    assert (await store.routing("t")).traffic is None


async def test_deleting_a_version_the_split_names_is_refused(store):
    for _ in range(3):
        await store.put(make_artifact("t"))
    await store.set_traffic("t", {1: 50, 2: 0, 3: 50})
    for v in (1, 2):  # weight 0 too: the split still names it
        with pytest.raises(VersionConflict, match=rf"version {v} of 't' is named by its traffic split \(v1: 50"):
            await store.delete("t", v)
    assert [s["version"] for s in await store.versions("t")] == [1, 2, 3]
    await store.set_traffic("t", {1: 1, 3: 1})
    await store.delete("t", 2)  # no longer named
    assert [s["version"] for s in await store.versions("t")] == [1, 3]


async def test_a_rollback_clears_the_split_and_a_publish_keeps_it(store):
    for _ in range(2):
        await store.put(make_artifact("t"))
    await store.set_traffic("t", {1: 100})
    await store.put(make_artifact("t"))  # v3, current: the split still sends everything to v1
    assert await store.routing("t") == Routing(3, {1: 100}, False)
    events = await _events(store, 1, lambda: store.rollback("t", 2))
    assert events[0].type == "rollback" and events[0].current == 2
    routing = await store.routing("t")
    assert routing.current == 2 and routing.traffic is None


async def test_pins_are_stored_listed_announced_and_deleted_with_the_task(store):
    await store.put(make_artifact("a"))
    await store.put(make_artifact("b"))
    events = await _events(store, 2, lambda: _pin_both(store))
    assert events == [StoreEvent("pin", "a", current=1), StoreEvent("pin", "b", current=1)]
    assert await store.pinned_tasks() == ["a", "b"] and (await store.routing("a")).pinned
    events = await _events(store, 1, lambda: store.pin("a", False))
    assert events == [StoreEvent("unpin", "a", current=1)]
    assert await store.pinned_tasks() == ["b"] and not (await store.routing("a")).pinned
    with pytest.raises(TaskNotFound):
        await store.pin("nope")

    await store.set_traffic("b", {1: 1})
    await store.delete("b")
    assert await store.pinned_tasks() == []
    await store.put(make_artifact("b"))  # a new task of the same name starts with neither
    routing = await store.routing("b")
    assert routing.current == 2 and routing.traffic is None and not routing.pinned


async def _pin_both(store):
    await store.pin("a")
    await store.pin("b")
