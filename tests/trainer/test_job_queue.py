"""The job queue's state changes, on one Redis and on a Redis Cluster (its scripts touch one hash, in the queue's
slot): a cancel and a worker never overwrite each other, ended jobs drop their inline examples and expire, the view
never reads the examples, acknowledged messages leave the stream."""

import asyncio
import uuid

import pytest

from prefix_store import PrefixStore, connect
from prefix_store.jobs import JobEnded, JobNotFound, JobQueue, check_label_names
from tests.redis_topologies import redis_cluster

pytestmark = pytest.mark.redis
SPEC = {"task": "t", "method": "prompt_tuning", "examples": [{"text": "a", "label": "x"}] * 3, "dev_examples": None}


@pytest.fixture(params=["single", "cluster"])
async def queue(request, store, tmp_path):
    if request.param == "single":
        q = JobQueue(store.client, namespace=store.ns, ttl_s=600)
        await q.ensure_group()
        yield q
        return
    with redis_cluster(tmp_path) as c:
        s = PrefixStore(connect(c["url"]), namespace=f"q-{uuid.uuid4().hex[:8]}")
        q = JobQueue(s.client, namespace=s.ns, ttl_s=600)
        await q.ensure_group()
        yield q
        await s.aclose()


async def test_state_changes_never_overwrite_each_other(queue):
    c = queue.client
    job = await queue.enqueue(dict(SPEC))
    view = await queue.get(job)
    assert view["state"] == "queued" and view["inline_examples"] == 3 and "examples" not in view["spec"]
    assert (await queue.spec(job))["examples"] == SPEC["examples"], "the worker gets them back"

    claimed = await queue.claim("w", idle_ms=60_000, block_ms=100)
    assert claimed is not None and await queue.start(job, "w", 1)
    await queue.progress(job, {"step": 1})
    assert await queue.cancel(job) == "running"
    await queue.progress(job, {"step": 2})  # a late write of the stopped worker is dropped
    assert not await queue.finish(job, "succeeded", result={"version": 1}), "a cancelled job stays cancelled"
    view = await queue.get(job)
    assert view["state"] == "cancelled" and view["progress"] == {"step": 1} and "result" not in view
    assert view["released_at"] and view["expires_at"] and view["inline_examples"] == 3
    assert not await c.hexists(queue.prefix + job, "examples") and 0 < await c.ttl(queue.prefix + job) <= 600
    with pytest.raises(JobEnded, match="already cancelled"):
        await queue.cancel(job)
    await queue.ack(claimed.message_id)
    assert await c.xlen(queue.stream) == 0

    queued = await queue.enqueue(dict(SPEC))
    assert await queue.cancel(queued) == "queued"
    assert not await queue.start(queued, "w", 1), "a job cancelled while queued never starts"

    done = await queue.enqueue(dict(SPEC))
    assert await queue.start(done, "w", 1) and await queue.finish(done, "succeeded", result={"version": 2})
    assert (await queue.get(done))["result"] == {"version": 2}
    assert not await c.hexists(queue.prefix + done, "examples") and 0 < await c.ttl(queue.prefix + done) <= 600
    with pytest.raises(JobEnded, match="already succeeded"):
        await queue.cancel(done)
    for bad in ("nope", "../x", "a" * 200):
        with pytest.raises(JobNotFound):
            await queue.cancel(bad)
    assert not await queue.finish("nope", "failed", error="x") and not await c.exists(queue.prefix + "nope")


async def test_recent_lists_newest_first_a_page_at_a_time_and_forgets_expired_jobs(queue, monkeypatch):
    monkeypatch.setattr("prefix_store.jobs.MAX_JOB_INDEX", 3)
    jobs = []
    for _ in range(4):
        jobs.append(await queue.enqueue(dict(SPEC)))
        await asyncio.sleep(0.002)  # distinct scores: the order is by queuing time
    page, total = await queue.recent(0, 2)
    assert [j["job_id"] for j in page] == jobs[:0:-1][:2] and total == 3, "the oldest fell off the bounded index"
    assert all("examples" not in j["spec"] and j["inline_examples"] == 3 for j in page), "views, never the examples"
    page, total = await queue.recent(2, 2)
    assert [j["job_id"] for j in page] == [jobs[1]]
    assert (await queue.get(jobs[0]))["state"] == "queued", "a job off the index is still readable by id"
    await queue.client.delete(queue.prefix + jobs[2])  # its record expired
    page, total = await queue.recent(0, 10)
    assert [j["job_id"] for j in page] == [jobs[3], jobs[1]] and total == 2


def test_label_names():
    assert check_label_names(["Sci/Tech", "not_entailment", "rock & roll", "4+", "positive 😀", "Ünïcode"], "l")
    for labels, words in [
        (["ok", "root:x:0:0"], "labels[1]: a character (Unicode category Po)"),
        (["ok", "KEY=value"], "labels[1]: a character (Unicode category Sm)"),
        (["ok", "x" * 65], "expected 1 to 64 characters, got 65"),
        (["ok", " padded"], "leading or trailing whitespace"),
        (["ok", "line\nbreak"], "Unicode category Cc"),
        ([f"l{i}" for i in range(1025)], "at most 1024 labels, found 1025"),
        (["a", "a"], "1 repeated"),
    ]:
        with pytest.raises(ValueError, match="labels") as e:
            check_label_names(labels, "labels")
        assert words in str(e.value) and "root:x" not in str(e.value) and "KEY=" not in str(e.value)
