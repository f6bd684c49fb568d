"""A training job's life through the API, with a real service over HTTP, a real Redis and a real worker process:
cancel (queued: never started; running: stopped within a second, nothing published, the message released), the
record's TTL once it ended, a view without the inline examples, a sweep's parallelism capped at the worker's cores,
and a worker that outlives Redis restarts, idle and mid-training."""

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import httpx
import pytest
import redis

from prefix_store import EmbeddedRedis
from prefix_store.keys import KeyLayout
from service.app import create_app
from service.runtime import load_backbone
from service.settings import ServiceSettings
from tests.service.live import live_server
from tests.trainer.test_worker import DATA, ROOT, model_dir, start_worker, stop  # noqa: F401 (fixture)

pytestmark = [pytest.mark.redis, pytest.mark.slow]
TTL = 3600
JOB = {
    "method": "p_tuning_v2",
    "examples": DATA,
    "num_virtual_tokens": 4,
    "max_new_tokens": 2,
    "publish_degenerate": True,
}
LONG = {**JOB, "steps": 1_000_000, "eval_every": 1_000_000, "checkpoint_every": 1_000_000}


async def until(c, job_id, cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        job = (await c.get(f"/v1/train/{job_id}")).json()
        if cond(job):
            return job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.1)


def step(job) -> int:
    return (job.get("progress") or {}).get("step", 0)


@pytest.fixture(scope="module")
def stack(model_dir, redis_server, tmp_path_factory):  # noqa: F811
    """A service and one worker pinned to one core, on a namespace of their own, shared by this module's tests."""
    ns, tmp = f"life-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp("life")
    settings = ServiceSettings(redis_url=redis_server.url, namespace=ns, job_ttl_s=TTL)
    app = create_app(settings, backbone=load_backbone(str(model_dir), local_files_only=True))
    env = {"PREFIXSERVE_JOB_TTL_S": str(TTL), "PREFIXSERVE_CANCEL_POLL_S": "0.2"}
    core = min(os.sched_getaffinity(0))
    worker = start_worker(
        model_dir, redis_server.url, ns, tmp / "work", "w1", tmp / "w1.log", env_extra=env, cores={core}
    )
    try:
        with live_server(app) as url:
            yield {"url": url, "ns": ns, "raw": redis.Redis.from_url(redis_server.url), "log": tmp / "w1.log"}
    finally:
        stop(worker)


async def test_cancel_queued_and_running_jobs_ttl_and_view(stack):
    raw, keys = stack["raw"], KeyLayout(stack["ns"])
    async with httpx.AsyncClient(base_url=stack["url"], timeout=30) as c:
        r = await c.post("/v1/train", json={"task": "long", **LONG})
        assert r.status_code == 202
        a = r.json()
        assert "examples" not in a["spec"] and a["inline_examples"] == len(DATA), "the view holds no examples"
        await until(c, a["job_id"], lambda j: j["state"] == "running" and step(j) >= 3)

        # B waits behind A (one worker). Cancelled while queued (through the admin CLI), it is never started.
        b = (await c.post("/v1/train", json={"task": "never", **JOB, "steps": 2})).json()
        out = subprocess.run(
            [sys.executable, "-m", "service.cli", "--url", stack["url"], "--json", "train", "cancel", b["job_id"]],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert '"state": "cancelled"' in out.stdout
        assert not raw.hexists(keys.job_prefix + b["job_id"], "examples"), "its inline examples left Redis"
        assert 0 < raw.ttl(keys.job_prefix + b["job_id"]) <= TTL

        # A, running: stopped at its next step, unpublished, its message released.
        r = await c.delete(f"/v1/train/{a['job_id']}")
        assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
        t0 = time.monotonic()
        a = await until(c, a["job_id"], lambda j: j.get("released_at") is not None, timeout=10)
        assert time.monotonic() - t0 < 5, "the worker stops within a second or two"
        await asyncio.sleep(1.5)
        again = (await c.get(f"/v1/train/{a['job_id']}")).json()
        assert again["state"] == "cancelled" and step(again) == step(a), "no step after the cancel"
        assert (await c.get("/v1/tasks/long")).status_code == 404, "a cancelled job publishes nothing"
        assert raw.xpending(keys.jobs, "trainers")["pending"] == 0
        assert raw.ttl(keys.job_prefix + a["job_id"]) > 0

        r = await c.delete(f"/v1/train/{a['job_id']}")
        assert r.status_code == 409 and "already cancelled" in r.json()["error"]["message"], r.text
        assert (await c.delete("/v1/train/0123abcd")).status_code == 404
        assert (await c.delete("/v1/train/..%2Fetc")).status_code == 404

        # C runs to the end: the worker is free again (B was skipped), and C's record expires.
        cjob = (await c.post("/v1/train", json={"task": "short", **JOB, "steps": 4, "eval_every": 2})).json()
        done = await until(c, cjob["job_id"], lambda j: j["state"] in ("succeeded", "failed"))
        assert done["state"] == "succeeded" and done["result"]["version"] == 1, done
        assert done["expires_at"] and done["ended_at"] and done["inline_examples"] == len(DATA)
        assert "examples" not in done["spec"]
        key = keys.job_prefix + cjob["job_id"]
        assert not raw.hexists(key, "examples") and 0 < raw.ttl(key) <= TTL
        b = (await c.get(f"/v1/train/{b['job_id']}")).json()
        assert b["state"] == "cancelled" and b["worker"] is None and b["attempts"] == 0, b
        assert (await c.get("/v1/tasks/never")).status_code == 404
        assert raw.xlen(keys.jobs) == 0, "acknowledged messages leave the stream"
        r = await c.delete(f"/v1/train/{cjob['job_id']}")
        assert r.status_code == 409 and "already succeeded" in r.json()["error"]["message"]

        # The listing: newest first, a page at a time, bounded.
        page = (await c.get("/v1/train", params={"limit": 2})).json()
        assert [j["job_id"] for j in page["jobs"]] == [cjob["job_id"], b["job_id"]] and page["total"] == 3, page
        assert [j["state"] for j in page["jobs"]] == ["succeeded", "cancelled"]
        page = (await c.get("/v1/train", params={"offset": 2})).json()
        assert [j["job_id"] for j in page["jobs"]] == [a["job_id"]]
        r = await c.get("/v1/train", params={"limit": 101})
        assert r.status_code == 422 and "limit" in r.json()["error"]["message"], r.text
    assert "cancelled: training stopped, nothing published" in stack["log"].read_text()


async def test_sweep_parallelism_is_capped_at_the_workers_cores(stack):
    sweep = {"task": "grid", **JOB, "steps": 2, "eval_every": 2}
    sweep["sweep"] = {"lrs": [0.01, 0.02], "parallel": 16}
    async with httpx.AsyncClient(base_url=stack["url"], timeout=30) as c:
        r = await c.post("/v1/train", json=sweep)
        assert r.status_code == 202, r.text
        done = await until(c, r.json()["job_id"], lambda j: j["state"] in ("succeeded", "failed"), timeout=120)
    assert done["state"] == "succeeded", done
    assert done["result"]["parallel"] == {"requested": 16, "cores": 1, "effective": 1}
    assert done["progress"]["parallel"] == 1 and len(done["result"]["runs"]) == 2


async def test_the_worker_outlives_redis_restarts(model_dir, tmp_path):  # noqa: F811
    """Redis stopped and started again (as every restart of `make serve` does to its embedded one) while the worker
    waits for jobs, then while it trains: it keeps going, takes the next job and publishes the one it trained."""
    data_dir = tempfile.mkdtemp(prefix="ps-restart-")  # short: the unix socket lives there
    server = EmbeddedRedis(data_dir)
    url = server.start()
    ns = f"restart-{uuid.uuid4().hex[:8]}"
    app = create_app(
        ServiceSettings(redis_url=url, namespace=ns), backbone=load_backbone(str(model_dir), local_files_only=True)
    )
    env = {"PREFIXSERVE_REDIS_RETRY_MAX_S": "0.5"}
    worker = start_worker(model_dir, url, ns, tmp_path / "work", "w1", tmp_path / "w1.log", env_extra=env)

    def restart(down_s: float) -> None:
        server.stop()
        time.sleep(down_s)
        assert worker.poll() is None, (tmp_path / "w1.log").read_text()[-3000:]
        server.start()

    async def submit(c, spec):
        for _ in range(50):  # the service's first write after a restart may find Redis still loading: a 503
            r = await c.post("/v1/train", json=spec)
            if r.status_code != 503:
                break
            await asyncio.sleep(0.1)
        assert r.status_code == 202, r.text
        return r.json()["job_id"]

    try:
        with live_server(app) as base:
            async with httpx.AsyncClient(base_url=base, timeout=30) as c:
                deadline = time.monotonic() + 60
                while "waiting for jobs" not in (tmp_path / "w1.log").read_text():
                    assert time.monotonic() < deadline and worker.poll() is None, "the worker never started"
                    await asyncio.sleep(0.2)
                await asyncio.sleep(0.5)  # in its blocking read on the stream
                restart(1.5)  # while the worker waits for jobs
                first = await submit(c, {"task": "idle", **JOB, "steps": 4, "eval_every": 2})
                done = await until(c, first, lambda j: j["state"] in ("succeeded", "failed"), timeout=60)
                assert done["state"] == "succeeded" and done["result"]["version"] == 1, done

                steps = 400  # enough that the job is still training when the poll below sees it, however loaded
                second = await submit(c, {"task": "busy", **JOB, "steps": steps, "eval_every": steps})
                running = await until(
                    c,
                    second,
                    lambda j: (
                        j["state"] != "queued" and step(j) >= 5 or j["state"] != "running" and j["state"] != "queued"
                    ),
                )
                assert running["state"] == "running", (
                    f"the job ended before Redis could be restarted under it: {running}"
                )
                restart(1.5)  # while it trains
                done = await until(c, second, lambda j: j["state"] in ("succeeded", "failed"), timeout=120)
                assert done["state"] == "succeeded" and done["result"]["version"] == 1, done
                # The result says how many steps ran (progress is written at most once a second, and a write that
                # finds Redis down is dropped, so the last one seen may be older than the last step).
                assert done["worker"] == "w1" and done["attempts"] == 1 and done["result"]["steps"] == steps
        log = (tmp_path / "w1.log").read_text()
        assert "Redis unreachable (" in log and "Redis reachable again" in log  # waiting for jobs
        assert "Redis unreachable while it trains" in log
        assert worker.poll() is None
    finally:
        stop(worker)
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
