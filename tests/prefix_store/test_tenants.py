"""API keys in Redis (prefix_store.tenants): records, lookup by the secret's digest, revocation events, and the
sliding-window rate script, on a real Redis."""

import asyncio
import math

import pytest
from pydantic import ValidationError

from prefix_store.tenants import (
    KEY_PREFIX,
    WINDOW_MS,
    InvalidKeyName,
    KeyExists,
    KeyNotFound,
    KeySpec,
    KeyStore,
    TooManyKeys,
    digest,
)

pytestmark = pytest.mark.redis


@pytest.fixture
def keys(store):
    return KeyStore(store, max_keys=5)


async def test_create_lookup_list_delete(keys, store):
    record, secret = await keys.create(KeySpec(name="team-a", tasks=["sent-*"], requests_per_minute=10))
    assert secret.startswith(KEY_PREFIX) and len(secret) == len(KEY_PREFIX) + 43
    assert record.name == "team-a" and record.tasks == ["sent-*"] and record.priority == "normal"
    assert (await keys.lookup(secret)) == record
    assert await keys.lookup(secret + "x") is None
    assert await keys.lookup("not-a-stored-key") is None  # never looked up: not the shape of a stored secret
    assert (await keys.get("team-a")) == record
    with pytest.raises(KeyExists, match="'team-a' exists"):
        await keys.create(KeySpec(name="team-a"))
    # Redis holds the digest, never the secret.
    raw = store.client
    dumped = [await raw.hgetall(store.keys.key_records), await raw.hgetall(store.keys.key_digests)]
    assert secret.encode() not in repr(dumped).encode() and digest(secret).encode() in repr(dumped).encode()

    for name in ("b", "c", "d"):
        await keys.create(KeySpec(name=name))
    page = await keys.list_keys(limit=2)
    assert [r.name for r in page] == ["b", "c"]
    assert [r.name for r in await keys.list_keys(after="c", limit=10)] == ["d", "team-a"]
    await keys.create(KeySpec(name="e"))
    with pytest.raises(TooManyKeys, match="5 keys exist"):
        await keys.create(KeySpec(name="f"))

    await keys.delete("team-a")
    assert await keys.lookup(secret) is None
    with pytest.raises(KeyNotFound):
        await keys.get("team-a")
    with pytest.raises(KeyNotFound):
        await keys.delete("team-a")
    with pytest.raises(InvalidKeyName):
        await keys.get("no spaces")


async def test_revocation_is_announced(keys):
    _, _ = await keys.create(KeySpec(name="gone"))
    subscribed = asyncio.Event()
    seen = []

    async def listen():
        async for event in keys.events(on_subscribed=subscribed.set):
            seen.append(event)
            return

    listener = asyncio.create_task(listen())
    await asyncio.wait_for(subscribed.wait(), 5)
    await keys.delete("gone")
    await asyncio.wait_for(listener, 5)
    assert [(e.type, e.name) for e in seen] == [("revoke", "gone")]


def test_spec_validation_says_what_was_expected():
    for body, words in [
        ({"name": "bad name"}, "invalid key name 'bad name'"),
        ({"name": "a", "tasks": []}, "tasks"),
        ({"name": "a", "tasks": ["Sent*"]}, "tasks[0] 'Sent*': expected a glob"),
        ({"name": "a", "scope": "admin", "tasks": ["x"]}, "an admin key sees every task"),
        ({"name": "a", "scope": "metrics", "requests_per_minute": 5}, "a metrics key has none"),
        ({"name": "a", "scope": "root"}, "scope"),
        ({"name": "a", "requests_per_minute": 0}, "requests_per_minute"),
        ({"name": "a", "secret": "mine"}, "secret"),
    ]:
        with pytest.raises(ValidationError) as e:
            KeySpec(**body)
        assert words in str(e.value), (body, str(e.value))
    assert KeySpec(name="a", tasks=["x", "x", "y*"]).tasks == ["x", "y*"]


async def _now_ms(store) -> int:
    s, us = await store.client.time()
    return int(s) * 1000 + int(us) // 1000


async def test_requests_and_tokens_per_minute(keys, store):
    limits = {"requests_per_minute": 3, "tokens_per_minute": 100}
    for _ in range(2):
        assert (await keys.charge("k", **limits, tokens=30)).charged
    refused = await keys.charge("k", **limits, tokens=50)  # 60 + 50 tokens > 100: the token limit refuses
    assert not refused.charged and refused.limit == "tokens_per_minute"
    assert 0 < refused.retry_after_ms <= 2 * WINDOW_MS
    third = await keys.charge("k", **limits, tokens=40)
    assert third.charged
    refused = await keys.charge("k", **limits, tokens=0)  # the fourth request
    assert not refused.charged and refused.limit == "requests_per_minute" and refused.retry_after_ms > 0
    never = await keys.charge("k", **limits, tokens=101)
    assert not never.charged and never.limit == "tokens_per_minute" and never.retry_after_ms is None
    await keys.refund("k", third, tokens=40)  # taken back: one request and 40 tokens free again
    assert (await keys.charge("k", **limits, tokens=40)).charged
    # Counters live in one hash under the key's tag, expiring two windows after the last charge.
    rate = store.keys.key_rate("k")
    assert 0 < await store.client.pttl(rate) <= 2 * WINDOW_MS
    assert all(f.decode()[0] in "rt" for f in await store.client.hkeys(rate))
    # Limits of other keys are their own; a key without limits is never refused.
    assert (await keys.charge("other", **limits, tokens=100)).charged
    assert (await keys.charge("free", requests_per_minute=None, tokens_per_minute=None, tokens=10**9)).charged


async def test_the_window_slides(keys, store):
    """With the previous window full (3 of 3) and the current one empty, a request passes once a third of the current
    window has gone (3 x (W - e) / W <= 2), and Retry-After is computed from exactly that."""
    rate = store.keys.key_rate("slide")
    for _ in range(5):  # a window boundary between setting up and charging would change the arithmetic: retry
        now = await _now_ms(store)
        w, elapsed = divmod(now, WINDOW_MS)
        if elapsed > WINDOW_MS - 2000:
            await asyncio.sleep((WINDOW_MS - elapsed) / 1000 + 0.05)
            continue
        await store.client.delete(rate)
        await store.client.hset(rate, f"r{w - 1}", 3)
        res = await keys.charge("slide", requests_per_minute=3, tokens_per_minute=None, tokens=1)
        if (await _now_ms(store)) // WINDOW_MS != w:
            continue
        if elapsed >= WINDOW_MS / 3 + 50:
            assert res.charged
        elif elapsed < WINDOW_MS / 3 - 50:
            assert not res.charged
            expected = math.ceil(WINDOW_MS / 3) - elapsed
            assert abs(res.retry_after_ms - expected) < 50, (res, expected)
        return
    pytest.fail("the window rolled over five times in a row")


async def test_a_full_current_window_waits_for_the_next(keys, store):
    """4 of 4 in the current window: nothing passes until the next window has moved far enough past them."""
    rate = store.keys.key_rate("full")
    w, elapsed = divmod(await _now_ms(store), WINDOW_MS)
    if elapsed > WINDOW_MS - 2000:  # not across a window boundary
        await asyncio.sleep((WINDOW_MS - elapsed) / 1000 + 0.05)
        w, elapsed = divmod(await _now_ms(store), WINDOW_MS)
    await store.client.hset(rate, f"r{w}", 4)
    res = await keys.charge("full", requests_per_minute=4, tokens_per_minute=None, tokens=1)
    assert not res.charged
    # Next window: 4 x (W - e') / W <= 3 once e' >= W / 4.
    expected = (WINDOW_MS - elapsed) + WINDOW_MS / 4
    assert abs(res.retry_after_ms - expected) < 50


async def test_over_limit_reads_the_window_without_counting(keys, store):
    """The pre-check: a key over its requests per minute, or at its tokens per minute, is refused as `charge` would
    refuse any request then (with the same Retry-After maths); below both it passes; it never counts anything."""
    limits = {"requests_per_minute": 2, "tokens_per_minute": 10}
    assert await keys.over_limit("k", **limits) is None
    assert (await keys.charge("k", **limits, tokens=9)).charged
    rate = store.keys.key_rate("k")
    before = await store.client.hgetall(rate)
    assert await keys.over_limit("k", **limits) is None  # one request left, and one token: a request could pass
    assert await store.client.hgetall(rate) == before, "a pre-check counts nothing"
    assert (await keys.charge("k", **limits, tokens=1)).charged
    over = await keys.over_limit("k", **limits)  # 2 of 2 requests and 10 of 10 tokens
    refused = await keys.charge("k", **limits, tokens=1)
    assert over is not None and not over.charged and not refused.charged
    assert over.limit == refused.limit and abs(over.retry_after_ms - refused.retry_after_ms) < 50
    assert 0 < over.retry_after_ms <= 2 * WINDOW_MS
    only_tokens = await keys.over_limit("k", requests_per_minute=None, tokens_per_minute=10)
    assert only_tokens is not None and only_tokens.limit == "tokens_per_minute"
    assert await keys.over_limit("k", requests_per_minute=3, tokens_per_minute=11) is None
    assert await keys.over_limit("free", requests_per_minute=None, tokens_per_minute=None) is None


async def test_creation_is_announced(keys):
    subscribed = asyncio.Event()
    seen = []

    async def listen():
        async for event in keys.events(on_subscribed=subscribed.set):
            seen.append(event)
            if len(seen) == 2:
                return

    listener = asyncio.create_task(listen())
    await asyncio.wait_for(subscribed.wait(), 5)
    await keys.create(KeySpec(name="new"))
    await keys.delete("new")
    await asyncio.wait_for(listener, 5)
    assert [(e.type, e.name) for e in seen] == [("create", "new"), ("revoke", "new")]


async def test_a_page_ends_at_the_last_name_listed_even_if_its_record_is_gone(keys, store):
    """A key revoked between the range of names and the read of their records shortens its page, never the listing:
    `next` is the last name the range returned."""
    for name in ("a", "b", "c"):
        await keys.create(KeySpec(name=name))
    await store.client.hdel(store.keys.key_records, "b")  # as a revocation between the two reads leaves it seen
    page, following = await keys.page_keys(limit=2)
    assert [r.name for r in page] == ["a"] and following == "b"
    page, following = await keys.page_keys(after=following, limit=2)
    assert [r.name for r in page] == ["c"] and following is None
    assert [r.name for r in await keys.list_keys()] == ["a", "c"]
