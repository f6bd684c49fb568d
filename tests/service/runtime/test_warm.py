"""Keeping tasks warm in the device tier, on the engine directly (no Redis): a pinned prefix survives the cache
pressure that evicts the others, pins are bounded by their share of the pool (refused past it, with the bytes needed
and left) so the rest always serves every other task, unpinning makes a prefix evictable again, a new version of a
pinned task takes its pin, a deleted one loses it, and `warm` (preloading) only fills room nothing uses. The warm set
retries a pin that finds the room held by running rows until they finish, a newer event superseding it. Then the host
tier's traffic split: the events that set, keep and clear it, and the draw -> version walk."""

from __future__ import annotations

import asyncio
import copy
import logging
import time

import pytest

from prefix_store import BackboneFingerprint, StoreEvent
from service.runtime import EngineRequest, SamplingParams
from service.runtime.engine import DeviceFull
from service.runtime.errors import InputTooLong, PinRefused
from service.runtime.host_cache import pick
from service.runtime.kv_cache import BLOCK
from service.runtime.warm import WarmSet
from tests.engine_harness import engine_for, generate, stored
from tests.factories import make_artifact
from tests.models import tiny_model
from tests.service.runtime.test_host_cache import cache_with


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _art(llama, task: str, version: int = 1, P: int = 4):
    fp = BackboneFingerprint.from_config(llama.config)
    return stored(make_artifact(task, "p_tuning_v2", P=P, fp=fp, seed=version), version)


def _engine(llama, prefixes: int, **kw):
    """An engine whose device prefix cache holds `prefixes` prefixes of 4 tokens (one pool block each); pins may hold
    half of them (the default PREFIXSERVE_PIN_FRACTION)."""
    fp = BackboneFingerprint.from_config(llama.config)
    block = 2 * fp.num_layers * fp.num_kv_heads * fp.head_dim * 4 * BLOCK  # keys and values, fp32
    return engine_for(copy.deepcopy(llama), device_cache_bytes=prefixes * block, **kw), block


def _touch(engine, art) -> None:
    """A request's use of the prefix (loaded and held, then released): the cache pressure of ordinary traffic."""
    failed = engine.load([EngineRequest.generate("r", [5], art, SamplingParams(max_new_tokens=1))])["r"]
    if failed is not None:
        raise failed
    engine.device_cache.release(art.key, "r")


def test_a_pinned_prefix_survives_the_pressure_that_evicts_the_others(llama):
    engine, block = _engine(llama, 2)
    a, b, c, d = (_art(llama, t) for t in "abcd")
    assert engine.pin(a) == block and engine.pins == {"a": 1}
    for art in (b, c, d, b, c, d):  # one room left for three tasks: each load evicts the last
        _touch(engine, art)
    assert engine.is_resident("a", 1) and engine.device_cache.stats["evictions"] == 5
    assert [engine.is_resident(t, 1) for t in "bcd"] == [False, False, True]
    out = generate(engine, [EngineRequest.generate("g", [5, 6, 7], a, SamplingParams(max_new_tokens=3))])
    assert len(out[0].token_ids) == 3  # a pinned prefix serves as any other

    engine.unpin("a")
    assert engine.pins == {}
    _touch(engine, b)  # evicts d, the least recently used
    _touch(engine, c)  # then a, no longer kept
    assert not engine.is_resident("a", 1) and engine.is_resident("b", 1) and engine.is_resident("c", 1)


def _hold(engine, *arts) -> list[EngineRequest]:
    """Requests loaded and holding their prefixes (as rows waiting for admission or running do) until released."""
    reqs = [EngineRequest.generate(f"hold-{a.task}", [5], a, SamplingParams(max_new_tokens=1)) for a in arts]
    assert all(e is None for e in engine.load(reqs).values())
    return reqs


def _release(engine, reqs: list[EngineRequest]) -> None:
    for r in reqs:
        engine.release(r.artifact, r.request_id)  # applied at the engine's next call


def test_pins_are_bounded_by_their_share_of_the_budget(llama):
    engine, block = _engine(llama, 4)  # pins may hold 2 of the 4 blocks
    a, b, c, d, e = (_art(llama, t) for t in "abcde")
    engine.pin(a)
    engine.pin(b)
    with pytest.raises(
        PinRefused,
        match=rf"needs {block} bytes .* other pins hold {2 * block} of the {2 * block} pins may hold "
        rf"\(PREFIXSERVE_PIN_FRACTION of its {4 * block},",
    ) as refused:
        engine.pin(c)
    assert (refused.value.needed, refused.value.left) == (block, 0)
    assert engine.pins == {"a": 1, "b": 1} and not engine.is_resident("c", 1), "a refused pin loads nothing"
    for art in (c, d, e, c, d, e):  # the half pins leave serves every other task, which evict one another
        _touch(engine, art)
    assert engine.is_resident("a", 1) and engine.is_resident("b", 1) and engine.device_cache.stats["evictions"] == 4

    held = _hold(engine, c, d)  # rows hold the rest: an unpinned task waits, it cannot push a pinned one out
    with pytest.raises(DeviceFull, match=rf"pins hold {2 * block} of {4 * block} bytes") as full:
        _touch(engine, e)
    assert full.value.pinned == 2 * block
    _release(engine, held)
    _touch(engine, e)

    big = _art(llama, "big", P=12)  # 3 blocks: fits the cache, not beside the pins (the scheduler's 503)
    with pytest.raises(DeviceFull):
        _touch(engine, big)
    huge = _art(llama, "huge", P=20)  # 5 blocks: more than the whole cache, whatever it holds (the scheduler's 400)
    with pytest.raises(InputTooLong, match=rf"needs {5 * block} bytes: it does not fit the device cache at all"):
        _touch(engine, huge)
    engine.unpin("a")
    engine.unpin("b")
    with pytest.raises(PinRefused, match=rf"needs {3 * block} bytes"):  # more than pins may hold, even alone
        engine.pin(big)
    _touch(engine, big)  # the pins gone, it fits as an ordinary entry


def test_the_pin_fraction_sets_the_pins_share(llama):
    engine, block = _engine(llama, 4, pin_fraction=0.75)
    for t in "abc":
        engine.pin(_art(llama, t))
    with pytest.raises(PinRefused, match=r"0 left"):
        engine.pin(_art(llama, "d"))
    engine, _ = _engine(llama, 1)  # half of one block is no whole block: nothing can be pinned
    with pytest.raises(PinRefused, match=rf"needs {block} bytes .* other pins hold 0 of the 0 pins may hold"):
        engine.pin(_art(llama, "a"))


def test_a_new_version_takes_the_pin_and_a_deleted_task_loses_it(llama):
    engine, _ = _engine(llama, 4)
    a1, a2, b = _art(llama, "a", 1), _art(llama, "a", 2), _art(llama, "b")
    engine.pin(a1)
    engine.pin(b)
    engine.pin(a2)  # the pins' share is full, but a2 replaces a1's: the pin follows the version
    assert engine.pins == {"a": 2, "b": 1} and engine.is_resident("a", 2)
    engine.invalidate("a", None)  # the task deleted
    engine.unpin("nothing")  # applies what is pending, as every engine call does
    assert engine.pins == {"b": 1} and not engine.is_resident("a", 2)


def test_warm_fills_free_room_only(llama):
    engine, _ = _engine(llama, 2)
    a, b, c = (_art(llama, t) for t in "abc")
    assert engine.warm(a) and engine.warm(b) and engine.warm(a)
    assert not engine.warm(c), "full: preloading stops rather than evict what it loaded"
    assert engine.is_resident("a", 1) and engine.is_resident("b", 1) and not engine.is_resident("c", 1)
    assert not engine.pins, "a preloaded prefix is an ordinary cache entry"


# -- the warm set: pins heard from the store, retried while the room is held ---------------------------------------
class _Scheduler:
    """What the warm set uses of the scheduler: the engine, the host cache, and engine calls (run at once here)."""

    def __init__(self, engine, host_cache) -> None:
        self.engine, self.host_cache = engine, host_cache

    async def on_engine(self, fn):
        return fn(self.engine)


def _warm_set(engine, *arts, **kw) -> tuple[WarmSet, object]:
    cache, _ = cache_with(*arts)
    cache.current.update({a.task: a.version for a in arts})  # the last of a task's versions is current
    return WarmSet(_Scheduler(engine, cache), store=None, retry_s=(0.01, 0.05), **kw), cache


async def _until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_a_pin_heard_while_rows_hold_the_room_is_applied_once_they_finish(llama, caplog):
    caplog.set_level(logging.INFO, logger="service.runtime.warm")
    engine, _ = _engine(llama, 2)  # pins may hold one block
    a, b, c = (_art(llama, t) for t in "abc")
    warm, cache = _warm_set(engine, a, b, c)
    held = _hold(engine, b, c)  # two running rows hold the whole pool
    cache.apply(StoreEvent("pin", "a", current=1))  # another replica pinned it
    await _until(lambda: "a" in warm._retries)
    assert "pinning task 'a' on this replica failed for now: no room on the device" in caplog.text
    assert "not pinned here; retrying" in caplog.text
    await asyncio.sleep(0.1)
    assert engine.pins == {} and "a" in warm._retries, "still held: still waiting, not given up"
    _release(engine, held)  # the rows finish
    await _until(lambda: engine.pins == {"a": 1})
    assert not warm._retries and "task 'a', its pin retried" in caplog.text and "v1 pinned here" in caplog.text
    await warm.stop()


async def test_a_published_version_waits_for_room_while_the_old_one_stays_pinned(llama, caplog):
    engine, _ = _engine(llama, 2)
    a1, a2, b = _art(llama, "a", 1), _art(llama, "a", 2), _art(llama, "b")
    warm, cache = _warm_set(engine, a1, b)
    cache.apply(StoreEvent("pin", "a", current=1))
    await _until(lambda: engine.pins == {"a": 1})
    held = _hold(engine, a1, b)  # rows of v1 and of b: v1 cannot make way for v2
    cache.lru.put(a2.key, a2)
    cache.apply(StoreEvent("publish", "a", 2, current=2))
    await _until(lambda: "a" in warm._retries)
    assert engine.pins == {"a": 1} and "v1 pinned here; retrying" in caplog.text, "the log says what is pinned"
    _release(engine, held)
    await _until(lambda: engine.pins == {"a": 2})
    assert engine.is_resident("a", 2)
    await warm.stop()


async def test_a_retry_is_superseded_by_the_next_event_and_bounded(llama, caplog):
    engine, _ = _engine(llama, 2)
    a, b, c = (_art(llama, t) for t in "abc")
    warm, cache = _warm_set(engine, a, b, c, retry_attempts=3)
    held = _hold(engine, b, c)
    cache.apply(StoreEvent("pin", "a", current=1))
    await _until(lambda: "a" in warm._retries)
    retry = warm._retries["a"]
    cache.apply(StoreEvent("unpin", "a", current=1))  # unpinned meanwhile: nothing is left to retry
    await _until(lambda: retry.done())
    assert retry.cancelled() and not warm._retries
    _release(engine, held)
    await asyncio.sleep(0.1)
    assert engine.pins == {}

    held = _hold(engine, b, c)
    cache.apply(StoreEvent("pin", "a", current=1))
    await _until(lambda: "gave up pinning task 'a' on this replica after 3 retries" in caplog.text)
    assert not warm._retries and engine.pins == {}
    _release(engine, held)
    cache.apply(StoreEvent("pin", "a", current=1))  # heard again (or at the next resubscription): applied now
    await _until(lambda: engine.pins == {"a": 1})
    await warm.stop()


# -- the host tier's traffic split ---------------------------------------------------------------------------------
def test_traffic_events_set_keep_and_clear_the_split():
    cache, _ = cache_with()
    cache.apply(StoreEvent("traffic", "t", current=2, traffic={"1": 90, "2": 10}))
    assert cache.current["t"] == 2 and cache.traffic["t"] == {1: 90, 2: 10}
    cache.apply(StoreEvent("publish", "t", 3, current=3))
    assert cache.current["t"] == 3 and cache.traffic["t"] == {1: 90, 2: 10}, "a publish leaves the split"
    cache.apply(StoreEvent("rollback", "t", 1, current=1))
    assert cache.traffic["t"] is None, "a rollback clears it (the store did)"
    cache.apply(StoreEvent("traffic", "t", current=1, traffic={"1": 1}))
    cache.apply(StoreEvent("traffic", "t", current=1, traffic=None))
    assert cache.traffic["t"] is None
    cache.apply(StoreEvent("traffic", "t", current=1, traffic={"1": 1}))
    cache.apply(StoreEvent("delete", "t"))
    assert "t" not in cache.traffic
    cache.apply(StoreEvent("traffic", "u", current=1, traffic={"1": 1}))
    cache._on_subscribed()
    assert cache.traffic == {}, "a resubscription forgets every split, as every current version"


async def test_choose_follows_the_split_known_here():
    cache, _ = cache_with()
    cache.apply(StoreEvent("traffic", "t", current=3, traffic={"1": 1, "3": 3}))
    assert await cache.choose("t", 0.0) == 1 and await cache.choose("t", 0.2499) == 1
    assert await cache.choose("t", 0.25) == 3 and await cache.choose("t", 0.9999) == 3
    cache.apply(StoreEvent("traffic", "t", current=3, traffic=None))
    assert await cache.choose("t", 0.1) is None, "no split: the current version"


def test_pick_walks_cumulative_weights_in_version_order():
    split = {2: 10, 1: 90, 5: 0}
    assert [pick(split, x) for x in (0.0, 0.89, 0.9, 0.99)] == [1, 1, 2, 2]
    assert pick(split, 1 - 1e-17) == 2 and pick({1: 0, 4: 5, 7: 0}, 0.999) == 4, "weight 0 is never chosen"
    draws = [i / 1000 for i in range(1000)]
    assert sum(pick({1: 50, 2: 50}, x) == 1 for x in draws) == 500
