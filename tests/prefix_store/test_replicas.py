"""Replica views in Redis: the most recently announced first, gone once silent past their TTL or withdrawn, and
bounded in size."""

import asyncio

import pytest

from prefix_store.replicas import MAX_VIEW_BYTES, ReplicaRegistry

pytestmark = pytest.mark.redis


async def test_views_expire_unless_announced_again_and_withdraw_at_once(store):
    reg = ReplicaRegistry(store.client, namespace=store.ns)
    assert await reg.views() == []
    await reg.announce("a", {"resident": {"t": [1]}}, ttl_s=0.3)
    await asyncio.sleep(0.01)
    await reg.announce("b", {"resident": {}}, ttl_s=30)
    views = await reg.views()
    assert [v["replica"] for v in views] == ["b", "a"] and views[1]["resident"] == {"t": [1]}
    await asyncio.sleep(0.5)  # a fell silent past its TTL
    assert [v["replica"] for v in await reg.views()] == ["b"]
    await reg.withdraw("b")
    assert await reg.views() == []
    with pytest.raises(ValueError, match=f"at most {MAX_VIEW_BYTES}"):
        await reg.announce("c", {"resident": {"t" * MAX_VIEW_BYTES: [1]}}, ttl_s=30)
    assert await reg.views() == [], "nothing of a refused view is stored"
