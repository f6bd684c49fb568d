"""Moving a namespace written by an earlier release (key layout 1, no hash tags) to the current layout: every task,
version, version counter and queued training job is found again; running it twice changes nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from prefix_store import PrefixStore, TaskNotFound, encode
from prefix_store.jobs import GROUP, JobQueue
from prefix_store.keys import LAYOUT
from tests.factories import make_artifact

pytestmark = pytest.mark.redis


async def write_layout_1(store: PrefixStore) -> None:
    """What layout 1's store and queue left in Redis: two tasks (a with v1 and v3, current v1; b with v1), the
    version counter of a deleted task c, and a queued job already delivered once."""
    r, ns = store.client, store.ns
    for task, versions, current in (("a", [1, 3], 1), ("b", [1], 1)):
        for v in versions:
            art = dataclasses.replace(make_artifact(task, seed=v), version=v, created_at="2026-01-01T00:00:00+00:00")
            meta = json.dumps({**art.summary(), "encoded_bytes": 1})
            await r.hset(f"{ns}:task:{task}:v:{v}", mapping={"meta": meta, "blob": encode(art)})
            await r.zadd(f"{ns}:task:{task}:versions", {str(v): v})
        await r.hset(f"{ns}:task:{task}", mapping={"current": current, "latest": max(versions)})
        await r.set(f"{ns}:task:{task}:seq", max(versions))
        await r.sadd(f"{ns}:tasks", task)
    await r.set(f"{ns}:task:c:seq", 4)
    await r.hset(f"{ns}:train:job:j1", mapping={"state": "queued", "spec": "{}", "attempts": 0})
    await r.xgroup_create(f"{ns}:train:jobs", GROUP, id="0", mkstream=True)
    await r.xadd(f"{ns}:train:jobs", {"job": "j1"})
    await r.xreadgroup(GROUP, "old-worker", {f"{ns}:train:jobs": ">"}, count=1)


async def test_layout_1_is_moved(store):
    await write_layout_1(store)
    moved = await store.migrate_layout()
    assert (moved.tasks, moved.keys, moved.kept, moved.jobs) == (3, 10, 0, 1)
    assert [(i.name, i.current, i.versions) for i in await store.list_tasks()] == [("a", 1, [1, 3]), ("b", 1, [1])]
    assert (await store.get("a", 3)).version == 3
    assert (await store.put(make_artifact("a"))).version == 4, "the version counter moved with its task"
    assert (await store.put(make_artifact("c"))).version == 5, "also the counter of a deleted task"
    assert await store.client.keys(f"{store.ns}:task*") == [], "nothing is left at the old places"

    queue = JobQueue(store.client, namespace=store.ns)
    assert (await queue.get("j1"))["state"] == "queued"
    claimed = await queue.claim("new-worker", idle_ms=0, block_ms=10)
    assert claimed is not None and claimed.job_id == "j1" and claimed.reclaimed, "its delivery state moved too"

    assert await store.client.get(store.keys.layout) == str(LAYOUT).encode()
    assert not await PrefixStore(store.client, namespace=store.ns).migrate_layout(), "a second run moves nothing"


async def test_the_first_read_moves_when_the_start_could_not(store):
    """A process that started while Redis was down has not moved the keys: its first read does, before reading."""
    await write_layout_1(store)
    assert (await store.get("a", 3)).version == 3
    with pytest.raises(TaskNotFound):
        await store.get("c")  # only its counter existed


async def test_processes_moving_at_once_lose_and_double_nothing(store):
    await write_layout_1(store)
    queue = JobQueue(store.client, namespace=store.ns)
    await queue.ensure_group()  # a worker of this release made the new stream first: the old jobs are queued on it
    others = [PrefixStore(store.client, namespace=store.ns) for _ in range(4)]
    moved = await asyncio.gather(*(s.migrate_layout() for s in others))
    assert sum(m.tasks for m in moved) >= 3 and sum(m.keys for m in moved) == 10 and sum(m.jobs for m in moved) == 1
    assert await store.client.xlen(store.keys.jobs) == 1, "the old stream's job is queued once"
    assert [i.name for i in await store.list_tasks()] == ["a", "b"]


async def test_a_counter_already_moved_keeps_the_larger_value(store):
    await write_layout_1(store)
    await store.client.set(store.keys.seq("a"), 7)  # a process of this release published a v7 of a first
    moved = await store.migrate_layout()
    assert moved.kept == 1
    assert (await store.put(make_artifact("a"))).version == 8
