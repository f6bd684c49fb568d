"""The metrics an inference gateway routes by (vLLM's shapes, under prefixserve: names) and the per-task series, on a
real Redis and a tiny Llama, scraped over HTTP and parsed as Prometheus text.

To see requests waiting and running at a known moment, the engine's step is gated: once a row runs, the next step
waits on an event until the test has scraped, so nothing moves in between (the event loop, which answers the scrape,
stays free)."""

import asyncio
import copy
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from prefix_store import BackboneFingerprint
from service.app import create_app
from service.metrics import KV_USAGE, LORA_INFO, NUM_RUNNING, NUM_WAITING
from service.runtime import wrap_model
from service.runtime.kv_cache import BLOCK, PrefixPool
from service.settings import ServiceSettings
from tests.factories import make_artifact
from tests.models import tiny_model, tiny_tokenizer
from tests.service.live import asgi_client

pytestmark = pytest.mark.redis

P = 4  # virtual tokens of every task here: one pool block


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def make_app(llama, redis_url, store, **settings):
    s = ServiceSettings(redis_url=redis_url, namespace=store.ns, **settings)
    return create_app(s, backbone=wrap_model(copy.deepcopy(llama), tiny_tokenizer(), name="tiny-llama"))


def pool_bytes(llama, blocks: int) -> int:
    """PREFIXSERVE_DEVICE_CACHE_BYTES for a prefix pool of `blocks` blocks (float32 key/values of every layer)."""
    cfg = llama.config
    column = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    return blocks * BLOCK * column


async def publish(store, llama, task, seed=0):
    fp = BackboneFingerprint.from_config(llama.config)
    return await store.put(make_artifact(task, fp=fp, P=P, seed=seed))


async def scrape(c) -> dict:
    """Sample name (a histogram's `_count`, ...) -> its samples, as a Prometheus server parses the exposition; the
    raw text under "_text"."""
    r = await c.get("/metrics")
    assert r.status_code == 200, r.text
    out: dict = {"_text": r.text}
    for fam in text_string_to_metric_families(r.text):
        for sample in fam.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(m, name, **labels) -> float | None:
    return next((s.value for s in m.get(name, []) if s.labels == labels), None)


def by_task(m, name) -> dict[str, float]:
    return {s.labels["task"]: s.value for s in m.get(name, [])}


def gate(engine) -> threading.Event:
    """Holds the engine before any step taken while a row runs, until the returned event is set."""
    release, step = threading.Event(), engine.step

    def gated(plan):
        if engine.running and not release.is_set():
            release.wait(30)
        return step(plan)

    engine.step = gated
    return release


async def until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def gen(task, new=6):
    return {"task": task, "input_ids": [5, 6], "max_new_tokens": new, "ignore_eos": True}


async def test_waiting_running_cache_usage_and_adapters(store, redis_url, llama):
    await publish(store, llama, "alpha", seed=1)
    await publish(store, llama, "beta", seed=2)
    # One row at a time; a pool of 8 blocks and a small token budget, so the usage is a readable fraction.
    pool_blocks = 8
    app = make_app(
        llama, redis_url, store, max_batch_size=1, max_batch_tokens=512, device_cache_bytes=pool_bytes(llama, 8)
    )
    async with asgi_client(app) as c:
        sched = app.state.services.scheduler
        engine = sched.engine
        assert engine.pool.max_blocks == pool_blocks

        idle = await scrape(c)
        text = idle["_text"]
        for name in ("num_requests_waiting", "num_requests_running", "kv_cache_usage_perc", "lora_requests_info"):
            assert f"# TYPE prefixserve:{name} gauge" in text
        assert value(idle, "prefixserve:num_requests_waiting") == 0
        assert value(idle, "prefixserve:num_requests_running") == 0
        assert value(idle, "prefixserve:kv_cache_usage_perc") == 0
        [info] = idle["prefixserve:lora_requests_info"]
        assert info.labels == {"max_lora": "1", "running_lora_adapters": "", "waiting_lora_adapters": ""}
        assert by_task(idle, "prefixserve_task_requests_waiting") == {}

        release = gate(engine)
        first = asyncio.create_task(c.post("/v1/generate", json=gen("alpha")))
        await until(lambda: sched.running == 1)
        later = [asyncio.create_task(c.post("/v1/generate", json=gen(t))) for t in ("alpha", "beta")]
        await until(lambda: sched.task_requests()[0] == {"alpha": 1, "beta": 1})
        ghost = await c.post("/v1/generate", json=gen("ghost"))
        assert ghost.status_code == 404

        t0 = time.time()
        busy = await scrape(c)
        assert value(busy, "prefixserve:num_requests_waiting") == 2
        assert value(busy, "prefixserve:num_requests_running") == 1
        # alpha's prefix (one block) is held by its running row; the row reserves prefix + prompt + new tokens.
        held, reserved = PrefixPool.blocks_for(P) * BLOCK, P + 2 + 6
        expected = (held + reserved) / (pool_blocks * BLOCK + 512)
        assert value(busy, "prefixserve:kv_cache_usage_perc") == pytest.approx(expected)
        [info] = busy["prefixserve:lora_requests_info"]
        assert info.labels == {"max_lora": "1", "running_lora_adapters": "alpha", "waiting_lora_adapters": "alpha,beta"}
        assert t0 - 1 <= info.value <= time.time() + 1  # the update time, unix seconds
        assert by_task(busy, "prefixserve_task_requests_waiting") == {"alpha": 1, "beta": 1}
        assert by_task(busy, "prefixserve_task_requests_running") == {"alpha": 1, "beta": 0}
        assert by_task(busy, "prefixserve_task_resident") == {"alpha": 1, "beta": 0}  # beta not loaded yet
        assert value(busy, "prefixserve_task_load_seconds_count", task="alpha", stage="fetch") == 1
        assert value(busy, "prefixserve_task_load_seconds_count", task="alpha", stage="device") == 1

        release.set()
        for r in [await first, *await asyncio.gather(*later)]:
            assert r.status_code == 200, r.text
        await until(lambda: sched.running == 0 and sched.queue_depth == 0)

        done = await scrape(c)
        assert value(done, "prefixserve:num_requests_waiting") == 0
        assert value(done, "prefixserve:num_requests_running") == 0
        # Both prefixes stay resident as a warm cache nobody holds: evictable, so not in use.
        assert value(done, "prefixserve:kv_cache_usage_perc") == 0
        [info] = done["prefixserve:lora_requests_info"]
        assert info.labels == {"max_lora": "1", "running_lora_adapters": "", "waiting_lora_adapters": ""}
        assert by_task(done, "prefixserve_task_resident") == {"alpha": 1, "beta": 1}
        assert by_task(done, "prefixserve_task_requests_waiting") == {"alpha": 0, "beta": 0}
        assert by_task(done, "prefixserve_task_request_latency_seconds_count") == {"alpha": 2, "beta": 1}
        assert by_task(done, "prefixserve_task_time_to_first_token_seconds_count") == {"alpha": 2, "beta": 1}
        assert value(done, "prefixserve_task_load_seconds_count", task="beta", stage="device") == 1
        # A name that is not a stored task never becomes a label value.
        assert "ghost" not in done["_text"]

        # A new version of alpha becomes current (store event): its resident copy is no longer the current one.
        await publish(store, llama, "alpha", seed=3)
        await until(lambda: sched.host_cache.current.get("alpha") == 2)
        after = await scrape(c)
        assert by_task(after, "prefixserve_task_resident") == {"alpha": 0, "beta": 1}


async def test_max_lora_is_bounded_by_rows_and_by_the_prefix_pool(store, redis_url, llama):
    await publish(store, llama, "alpha")
    # Room for three prefixes of one block each.
    app = make_app(llama, redis_url, store, max_batch_size=4, device_cache_bytes=pool_bytes(llama, 3))
    async with asgi_client(app) as c:
        [info] = (await scrape(c))["prefixserve:lora_requests_info"]
        assert info.labels["max_lora"] == "4"  # nothing resident: the rows alone bound it
        r = await c.post("/v1/generate", json=gen("alpha", new=1))
        assert r.status_code == 200, r.text
        m = await scrape(c)
        [info] = m["prefixserve:lora_requests_info"]
        assert info.labels["max_lora"] == "3"
        r = await c.post("/v1/generate", json=gen("base", new=1))  # the bare backbone: "base", never an adapter
        assert r.status_code == 200, r.text
        m = await scrape(c)
        assert by_task(m, "prefixserve_task_request_latency_seconds_count") == {"alpha": 1, "base": 1}
        assert "base" not in by_task(m, "prefixserve_task_resident")
        # What the gateway's metrics proxy asks for: those four series alone, whatever else there is.
        gauges = [NUM_WAITING, NUM_RUNNING, KV_USAGE, LORA_INFO]
        r = await c.get("/metrics", params=[("name[]", name) for name in gauges])
        assert r.status_code == 200 and "name%5B%5D" in str(r.request.url)
        assert [f.name for f in text_string_to_metric_families(r.text)] == gauges


def by_version(m, name, task="alpha") -> dict[str, float]:
    return {s.labels["version"]: s.value for s in m.get(name, []) if s.labels["task"] == task}


LATENCY = "prefixserve_task_request_latency_seconds_count"
TTFT = "prefixserve_task_time_to_first_token_seconds_count"
VERSIONS = "prefixserve_task_version_requests_total"


async def test_version_labels_follow_the_split_and_a_deleted_task_leaves_no_series(store, redis_url, llama):
    for seed in (1, 2):
        await publish(store, llama, "alpha", seed=seed)
    await publish(store, llama, "beta")
    app = make_app(llama, redis_url, store)
    async with asgi_client(app) as c:
        cache = app.state.services.host_cache

        async def call(model: str, n: int = 1) -> dict[str, float]:
            """n requests of distinct ids; how many ran each version (X-Prefix-Version)."""
            served: dict[str, float] = {}
            for i in range(n):
                body = {"task": model, "input_ids": [5, 6], "max_new_tokens": 1}
                r = await c.post("/v1/generate", json=body, headers={"x-request-id": f"{model}-{i}"})
                assert r.status_code == 200, r.text
                version = r.headers["x-prefix-version"]
                served[version] = served.get(version, 0) + 1
            return served

        r = await c.put("/v1/tasks/alpha/traffic", json={"weights": {"1": 50, "2": 50}})
        assert r.status_code == 200
        await until(lambda: cache.traffic.get("alpha") == {1: 50, 2: 50})
        split = await call("alpha", 12)  # the canary split: each version its own label value
        assert set(split) == {"1", "2"}
        await call("beta")
        m = await scrape(c)
        assert by_version(m, LATENCY) == split and by_version(m, TTFT) == split
        assert by_version(m, VERSIONS) == split
        assert value(m, VERSIONS, task="beta", version="1", status="200") == 1

        assert (await c.delete("/v1/tasks/alpha/traffic")).status_code == 204  # v2 alone: v1's series go
        await until(lambda: cache.traffic.get("alpha", 0) is None)
        await call("alpha@1")  # an older version: "other", not one series per version ever asked for
        m = await scrape(c)
        assert by_version(m, LATENCY) == {"2": split["2"], "other": 1}
        assert by_version(m, VERSIONS) == {"2": split["2"], "other": 1}

        await store.delete("alpha")  # as another replica would: the store event removes the task's series
        await until(lambda: "alpha" not in cache.current)
        assert (await c.delete("/v1/tasks/beta")).status_code == 204  # here: gone once this request is counted
        # the device tier drops a deleted task's prefix at its next step (invalidations are applied on the engine's
        # thread), so until one runs the task may still show as resident there: run one
        assert (await c.post("/v1/generate", json=gen("base", 1))).status_code == 200
        text = (await scrape(c))["_text"]
        assert 'task="alpha"' not in text and 'task="beta"' not in text, text
