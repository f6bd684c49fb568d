"""Keeping tasks warm in the device tier, on the engine directly (no Redis): a pinned prefix survives the cache
pressure that evicts the others, pins are bounded by the pool's budget (refused past it, with the bytes needed and
left), unpinning makes a prefix evictable again, a new version of a pinned task takes its pin, a deleted one loses it,
and `warm` (preloading) only fills room nothing uses. Then the host tier's traffic split: the events that set, keep
and clear it, and the draw -> version walk."""

from __future__ import annotations

import copy

import pytest

from prefix_store import BackboneFingerprint, StoreEvent
from service.runtime import EngineRequest, SamplingParams
from service.runtime.engine import DeviceFull
from service.runtime.errors import PinRefused
from service.runtime.host_cache import pick
from service.runtime.kv_cache import BLOCK
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


def _engine(llama, prefixes: int):
    """An engine whose device prefix cache holds `prefixes` prefixes of 4 tokens (one pool block each)."""
    fp = BackboneFingerprint.from_config(llama.config)
    block = 2 * fp.num_layers * fp.num_kv_heads * fp.head_dim * 4 * BLOCK  # keys and values, fp32
    return engine_for(copy.deepcopy(llama), device_cache_bytes=prefixes * block), block


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


def test_pins_are_bounded_by_the_budget(llama):
    engine, block = _engine(llama, 2)
    a, b, c = (_art(llama, t) for t in "abc")
    engine.pin(a)
    engine.pin(b)
    with pytest.raises(
        PinRefused, match=rf"needs {block} bytes .* other pins hold {2 * block} of its {2 * block}"
    ) as e:
        engine.pin(c)
    assert (e.value.needed, e.value.left) == (block, 0)
    assert engine.pins == {"a": 1, "b": 1} and not engine.is_resident("c", 1), "a refused pin loads nothing"
    with pytest.raises(DeviceFull):  # and an unpinned task cannot push a pinned one out
        _touch(engine, c)
    big = _art(llama, "big", P=12)  # 3 blocks: more than the whole budget, even alone
    engine.unpin("a")
    engine.unpin("b")
    with pytest.raises(PinRefused, match=rf"needs {3 * block} bytes"):
        engine.pin(big)


def test_a_new_version_takes_the_pin_and_a_deleted_task_loses_it(llama):
    engine, _ = _engine(llama, 2)
    a1, a2, b = _art(llama, "a", 1), _art(llama, "a", 2), _art(llama, "b")
    engine.pin(a1)
    engine.pin(b)
    engine.pin(a2)  # the budget is full of pins, but a2 replaces a1's: the pin follows the version
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
