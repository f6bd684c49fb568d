"""End to end: the service queues a job, a worker process trains and publishes, the next request serves the new
version; a second worker takes over the job of a worker killed mid-job."""

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.runtime import load_backbone
from service.settings import ServiceSettings
from tests.models import tiny_model, tiny_tokenizer
from tests.service.live import live_server

pytestmark = [pytest.mark.redis, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
DATA = [{"input": f"w{3 + i % 20} w{5 + i % 7}", "output": f"w{10 + i % 20} w{40 + i % 7}"} for i in range(60)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def service_app(model_dir, redis_url, ns):
    """The service on the same tiny model the workers load, on the test's Redis namespace."""
    backbone = load_backbone(str(model_dir), local_files_only=True)
    return create_app(ServiceSettings(redis_url=redis_url, namespace=ns), backbone=backbone)


def start_worker(model_dir, redis_url, ns, work_dir, name, log_path, *, env_extra=None, cores=None):
    """A `python -m trainer worker` process; `env_extra`: more PREFIXSERVE_* settings; `cores`: its CPU affinity."""
    env = {
        **os.environ,
        "PREFIXSERVE_BACKBONE": str(model_dir),
        "PREFIXSERVE_REDIS_URL": redis_url,
        "PREFIXSERVE_NAMESPACE": ns,
        "PREFIXSERVE_WORK_DIR": str(work_dir),
        "PREFIXSERVE_WORKER_NAME": name,
        "PREFIXSERVE_CLAIM_IDLE_S": "2",
        "PREFIXSERVE_HEARTBEAT_S": "0.3",
        "PREFIXSERVE_LOCAL_FILES_ONLY": "true",
        **(env_extra or {}),
    }
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", "worker"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
    )


def stop(worker) -> None:
    """SIGTERM (a worker finishes the job in hand first), then SIGKILL after 30 s."""
    worker.terminate()
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait(10)


async def _job(c, job_id, until, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        job = (await c.get(f"/v1/train/{job_id}")).json()
        if until(job):
            return job
        assert time.monotonic() < deadline and job["state"] != "failed", job
        await asyncio.sleep(0.2)


async def test_service_queues_worker_trains_next_request_serves(model_dir, redis_url, tmp_path):
    ns = f"e2e-{uuid.uuid4().hex[:8]}"
    app = service_app(model_dir, redis_url, ns)
    worker = start_worker(model_dir, redis_url, ns, tmp_path / "work", "w1", tmp_path / "w1.log")
    try:
        with live_server(app) as url:
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                body = {"task": "e2e", "prompt": "w5 w6", "max_new_tokens": 3}
                assert (await c.post("/v1/generate", json=body)).status_code == 404
                r = await c.post(
                    "/v1/train",
                    json={
                        "task": "e2e",
                        "method": "prefix_tuning",
                        "examples": DATA,
                        "steps": 30,
                        "eval_every": 15,
                        "num_virtual_tokens": 4,
                        "max_new_tokens": 4,
                        "lr": 0.01,
                    },
                )
                assert r.status_code == 202, r.text
                job = await _job(c, r.json()["job_id"], lambda j: j["state"] == "succeeded")
                assert job["result"]["published"] and job["result"]["version"] == 1 and job["worker"] == "w1"
                assert job["progress"]["step"] == 30 and "bleu" in job["result"]["metrics"]
                for _ in range(100):  # the service learns of the new version from the store's events
                    r = await c.post("/v1/generate", json=body)
                    if r.status_code == 200:
                        break
                    await asyncio.sleep(0.05)
                assert r.status_code == 200 and r.json()["version"] == 1

                # A sweep through the API: the worker trains the grid and publishes the best run as version 2.
                sweep = {
                    "task": "e2e",
                    "method": "prefix_tuning",
                    "examples": DATA,
                    "steps": 20,
                    "eval_every": 10,
                    "max_new_tokens": 4,
                    "publish_degenerate": True,
                    "sweep": {"lrs": [0.01, 0.05], "num_virtual_tokens": [2, 4]},
                }
                r = await c.post("/v1/train", json=sweep)
                assert r.status_code == 202, r.text
                job = await _job(c, r.json()["job_id"], lambda j: j["state"] == "succeeded")
                result = job["result"]
                assert len(result["runs"]) == 4 and result["published"] and result["version"] == 2
                assert job["progress"]["runs"] == 4 and "| run | method |" in result["table"]
                too_big = {**sweep, "sweep": {"lrs": [0.01] * 16, "num_virtual_tokens": list(range(1, 6))}}
                r = await c.post("/v1/train", json=too_big)
                assert r.status_code == 422 and "at most 64 runs" in r.json()["error"]["message"]

                bad = await c.post("/v1/train", json={"task": "e2e", "method": "no_such_method", "examples": DATA})
                assert bad.status_code == 422
                assert (await c.get("/v1/train/nope")).status_code == 404
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)


async def test_second_worker_takes_over_a_killed_workers_job(model_dir, redis_url, tmp_path):
    ns = f"reclaim-{uuid.uuid4().hex[:8]}"
    app = service_app(model_dir, redis_url, ns)
    first = start_worker(model_dir, redis_url, ns, tmp_path / "work", "doomed", tmp_path / "a.log")
    second = None
    try:
        with live_server(app) as url:
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                r = await c.post(
                    "/v1/train",
                    json={
                        "task": "slow",
                        "method": "p_tuning_v2",
                        "examples": DATA,
                        "steps": 800,
                        "eval_every": 400,
                        "checkpoint_every": 20,
                        "num_virtual_tokens": 4,
                        "max_new_tokens": 2,
                    },
                )
                job_id = r.json()["job_id"]
                await _job(
                    c, job_id, lambda j: j["state"] == "running" and (j.get("progress") or {}).get("step", 0) >= 40
                )
                first.kill()  # no goodbye: its message stays pending until it goes idle
                first.wait(10)
                second = start_worker(model_dir, redis_url, ns, tmp_path / "work", "rescuer", tmp_path / "b.log")
                job = await _job(c, job_id, lambda j: j["state"] == "succeeded", timeout=300)
                assert job["worker"] == "rescuer" and job["attempts"] == 2 and job["result"]["version"] == 1
        assert "took over job" in (tmp_path / "b.log").read_text()
        assert "resumed slow at step" in (tmp_path / "b.log").read_text()  # from the dead worker's checkpoint
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
