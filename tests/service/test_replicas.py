"""Replicas and a trainer together, as deployed: two service processes (`python -m service`) and one trainer worker
on one Redis, and again on a Redis Cluster. An upload through A is served by B on its next request; a training job
posted to A is trained by the worker and served by B; B killed in the middle of a stream leaves A serving."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from peft import PrefixTuningConfig

from tests.engine_harness import trained_peft
from tests.models import tiny_model
from tests.redis_topologies import redis_cluster
from tests.service.live import free_port
from tests.trainer.test_worker import DATA, ROOT, _job, model_dir, start_worker  # noqa: F401 (fixture)

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def start_service(model_path, redis_url: str, ns: str, port: int, log_path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PREFIXSERVE_BACKBONE": str(model_path),
        "PREFIXSERVE_REDIS_URL": redis_url,
        "PREFIXSERVE_NAMESPACE": ns,
        "PREFIXSERVE_LOCAL_FILES_ONLY": "true",
        "PREFIXSERVE_TORCH_THREADS": "1",
    }
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


async def ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=5) as c:
        while True:
            assert proc.poll() is None, "the service process exited"
            try:
                if (await c.get("/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the service did not get ready"
            await asyncio.sleep(0.3)


@pytest.fixture(params=["one-redis", "cluster"])
def deployed_redis(request, tmp_path):
    """The URL of one Redis, or of a 3-master Redis Cluster (each master with a replica) started here."""
    if request.param == "one-redis":
        yield request.getfixturevalue("redis_url")
        return
    (tmp_path / "cluster").mkdir()
    with redis_cluster(tmp_path / "cluster") as cluster:
        yield cluster["url"]


async def test_two_replicas_and_a_worker(model_dir, deployed_redis, tmp_path):  # noqa: F811
    redis_url = deployed_redis
    ns = f"rep-{uuid.uuid4().hex[:8]}"
    pa, pb = free_port(), free_port()
    a = start_service(model_dir, redis_url, ns, pa, tmp_path / "a.log")
    b = start_service(model_dir, redis_url, ns, pb, tmp_path / "b.log")
    worker = start_worker(model_dir, redis_url, ns, tmp_path / "work", "w1", tmp_path / "w1.log")
    procs = [a, b, worker]
    try:
        url_a, url_b = f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"
        await asyncio.gather(ready(url_a, a), ready(url_b, b))
        pm = trained_peft(tiny_model("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), seed=3)
        pm.save_pretrained(tmp_path / "adapter")
        files = {
            "adapter_config": (tmp_path / "adapter" / "adapter_config.json").read_bytes(),
            "adapter_model": (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes(),
        }
        gen = {"task": "alpha", "input_ids": [5, 6, 7], "max_new_tokens": 4}
        async with (
            httpx.AsyncClient(base_url=url_a, timeout=60) as ca,
            httpx.AsyncClient(base_url=url_b, timeout=60) as cb,
        ):
            assert (await ca.put("/v1/tasks/alpha", files=files)).status_code == 201
            r = await cb.post("/v1/generate", json=gen)  # B never saw the upload
            assert r.status_code == 200 and r.json()["version"] == 1, r.text
            assert r.json()["text"] == (await ca.post("/v1/generate", json=gen)).json()["text"]
            spec = {
                "task": "alpha",
                "method": "prefix_tuning",
                "examples": DATA,
                "steps": 30,
                "eval_every": 15,
                "num_virtual_tokens": 4,
                "max_new_tokens": 4,
                "lr": 0.01,
                "publish_degenerate": True,
            }
            job = (await ca.post("/v1/train", json=spec)).json()
            done = await _job(ca, job["job_id"], lambda j: j["state"] == "succeeded", timeout=150)
            assert done["result"]["version"] == 2 and done["worker"] == "w1", done
            for _ in range(100):  # B serves what the worker published through A's job, once the event arrives
                r = await cb.post("/v1/generate", json=gen)
                if r.json().get("version") == 2:
                    break
                await asyncio.sleep(0.05)
            assert r.status_code == 200 and r.json()["version"] == 2
            async with cb.stream("POST", "/v1/generate", json={**gen, "max_new_tokens": 200, "stream": True}) as s:
                async for _ in s.aiter_lines():
                    b.send_signal(signal.SIGKILL)  # B dies mid-stream
                    break
            b.wait(30)
            r = await ca.post("/v1/generate", json=gen)
            assert r.status_code == 200 and r.json()["version"] == 2
            assert (await ca.get("/ready")).status_code == 200
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait(30)
