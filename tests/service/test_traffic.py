"""Version pins, traffic splits and warm tasks over HTTP, on a real Redis and tiny random backbones.

`task@N` runs version N on every inference route, byte for byte what the route gave while N was current, and says
so (the `version` field where the body has one, the X-Prefix-Version header everywhere); an unknown version is a 404
naming it. A 50/50 split set on replica A reaches replica B (same Redis, its own server) within a second; a request
id always lands on the same version, on either replica; the split survives a restart, refuses the deletion of a
version it names, and goes with DELETE or a rollback. Preloaded tasks are resident when /ready first answers 200; a
pinned task survives the cache pressure that evicts the others, on every replica and across a restart, and a pin
beyond the device cache budget is refused with the bytes it needs."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import time

import httpx
import pytest
from peft import PrefixTuningConfig

from prefix_store import BackboneFingerprint, PrefixStore, import_peft_dir
from service.app import create_app
from service.dispatch import traffic_draw
from service.runtime import wrap_model
from service.runtime.host_cache import pick
from service.settings import ServiceSettings
from tests.engine_harness import trained_peft
from tests.factories import make_artifact
from tests.models import tiny_model, tiny_tokenizer
from tests.service.live import asgi_client, live_server
from tests.service.test_request_ids import captured  # noqa: F401 (fixture)

pytestmark = pytest.mark.redis

GEN = {"max_new_tokens": 4, "ignore_eos": True}
# Each version renders chats its own way, so /tokenize with messages shows which one ran.
TEMPLATES = {
    1: "{% for m in messages %}w5 {{ m['content'] }} {% endfor %}w6",
    2: "{% for m in messages %}w9 {{ m['content'] }} {% endfor %}w10 w11",
}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture
def app_on(redis_url, store):
    """A new app (a replica) on the test's Redis namespace around a copy of `model`."""

    def make(model, tokenizer=None, name="tiny-llama", **settings):
        s = ServiceSettings(redis_url=redis_url, namespace=store.ns, **settings)
        return create_app(s, backbone=wrap_model(copy.deepcopy(model), tokenizer, name=name))

    return make


async def publish(store, base, tmp_path, task, seed, task_type="CAUSAL_LM", **replace):
    pm = trained_peft(base, PrefixTuningConfig(task_type=task_type, num_virtual_tokens=4), seed=seed)
    out = tmp_path / f"{task}-{seed}"
    pm.save_pretrained(out)
    labels = ["neg", "neu", "pos"] if task_type == "SEQ_CLS" else None
    art = import_peft_dir(out, task=task, backbone=BackboneFingerprint.from_config(base.config), labels=labels)
    return await store.put(dataclasses.replace(art, **replace))


def _without(body: dict, *keys: str) -> dict:
    return {k: v for k, v in body.items() if k not in keys}


async def _causal_outputs(c: httpx.AsyncClient, model: str) -> dict[str, tuple[dict, str]]:
    """Each causal-LM inference route's deterministic output for `model`, and its X-Prefix-Version header."""
    calls = {
        "/v1/generate": {"task": model, "input_ids": [5, 6, 7], **GEN},
        "/v1/completions": {"model": model, "prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True, "temperature": 0},
        "/v1/chat/completions": {
            "model": model,
            "messages": [{"role": "user", "content": "w7 w8"}],
            "max_completion_tokens": 4,
            "ignore_eos": True,
            "temperature": 0,
        },
        "/tokenize": {"model": model, "messages": [{"role": "user", "content": "w7"}]},
    }
    out = {}
    for path, body in calls.items():
        r = await c.post(path, json=body)
        assert r.status_code == 200, (path, r.text)
        out[path] = (_without(r.json(), "task", "id", "created", "model"), r.headers["x-prefix-version"])
    return out


async def test_a_pin_runs_that_version_on_every_route(store, app_on, llama, tmp_path):
    await publish(store, llama, tmp_path, "alpha", 1, chat_template=TEMPLATES[1])
    async with asgi_client(app_on(llama, tiny_tokenizer())) as c:
        while_current = await _causal_outputs(c, "alpha")
        await publish(store, llama, tmp_path, "alpha", 2, chat_template=TEMPLATES[2])
        for _ in range(100):  # the app hears the publish
            r = await c.post("/v1/generate", json={"task": "alpha", "input_ids": [5], "max_new_tokens": 1})
            if r.json()["version"] == 2:
                break
            await asyncio.sleep(0.01)
        pinned = await _causal_outputs(c, "alpha@1")
        now = await _causal_outputs(c, "alpha")
        assert pinned == while_current, "alpha@1 is byte for byte what alpha gave while v1 was current"
        assert {v for _, v in pinned.values()} == {"1"} and {v for _, v in now.values()} == {"2"}
        assert pinned["/v1/generate"][0]["version"] == 1 and now["/v1/generate"][0]["version"] == 2
        for path in pinned:
            assert pinned[path][0] != now[path][0], f"{path}: v2 answers otherwise (the control)"
        r = await c.post(
            "/v1/generate", json={"task": "alpha@1", "input_ids": [5], "max_new_tokens": 1, "stream": True}
        )
        assert r.headers["x-prefix-version"] == "1" and '"version":1' in r.text.splitlines()[-2]
        r = await c.post("/v1/completions", json={"model": "alpha@1", "prompt": [5], "max_tokens": 1})
        assert r.json()["model"] == "alpha@1", "OpenAI routes answer the model as sent"

        cases = {
            "alpha@7": (404, "task 'alpha' has no version 7"),
            "nope@1": (404, "task 'nope' not found"),
            "alpha@0": (400, "a version pin is task@N with N a positive version number"),
            "alpha@x": (400, "got 'x' after the '@'"),
            "alpha@": (400, "a version pin is task@N"),
            "base@1": (400, "bare backbone, which has no versions"),
        }
        for model, (status, message) in cases.items():
            for path, body in (
                ("/v1/generate", {"task": model, "input_ids": [5], "max_new_tokens": 1}),
                ("/v1/completions", {"model": model, "prompt": [5], "max_tokens": 1}),
                ("/tokenize", {"model": model, "prompt": "w5"}),
                ("/detokenize", {"model": model, "tokens": [5]}),
            ):
                r = await c.post(path, json=body)
                assert r.status_code == status and message in r.json()["error"]["message"], (model, path, r.text)
                assert "x-prefix-version" not in r.headers


async def test_a_pin_on_the_encoder_routes(store, app_on, tmp_path):
    bert = tiny_model("bert-cls")
    await publish(store, bert, tmp_path, "sent", 1, task_type="SEQ_CLS")
    app = app_on(bert.bert, tiny_tokenizer(), name="tiny-bert")
    calls = {
        "/v1/classify": lambda m: {"task": m, "texts": ["w5 w6", "w7"]},
        "/v1/embeddings": lambda m: {"model": m, "input": [[5, 6, 7], [9, 10]]},
    }
    async with asgi_client(app) as c:
        before = {p: (await c.post(p, json=body("sent"))).json() for p, body in calls.items()}
        await publish(store, bert, tmp_path, "sent", 2, task_type="SEQ_CLS")
        await _until(lambda: app.state.services.host_cache.current.get("sent") == 2)
        for path, body in calls.items():
            r = await c.post(path, json=body("sent@1"))
            assert r.status_code == 200 and r.headers["x-prefix-version"] == "1", r.text
            assert _without(r.json(), "task", "model") == _without(before[path], "task", "model")
            r2 = await c.post(path, json=body("sent"))
            assert r2.headers["x-prefix-version"] == "2" and r2.json() != r.json()
        r = await c.post("/v1/classify", json={"task": "sent@1", "text": "w5"})
        assert r.json()["version"] == 1 and r.json()["task"] == "sent@1"


async def test_the_served_version_is_in_the_access_log(store, app_on, llama, tmp_path, captured):  # noqa: F811
    for seed in (1, 2):
        await publish(store, llama, tmp_path, "alpha", seed)
    with live_server(app_on(llama)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            for rid, task in (("pinned-1", "alpha@1"), ("current-1", "alpha"), ("bare-1", "base")):
                body = {"task": task, "input_ids": [5], "max_new_tokens": 1, "stream": rid == "pinned-1"}
                assert (await c.post("/v1/generate", json=body, headers={"x-request-id": rid})).status_code == 200
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    access = {line["request_id"]: line for line in lines if line["logger"] == "uvicorn.access"}
    assert access["pinned-1"]["served"] == "alpha@1" and access["current-1"]["served"] == "alpha@2"
    assert "served" not in access["bare-1"], "the bare backbone runs no task version"


def _expected(task: str, split: dict[int, int], rid: str) -> int:
    return pick(split, traffic_draw(task, rid))


async def _versions(c: httpx.AsyncClient, ids: list[str], task: str = "alpha") -> list[int]:
    body = {"task": task, "input_ids": [5], "max_new_tokens": 1}
    rs = [await c.post("/v1/generate", json=body, headers={"x-request-id": rid}) for rid in ids]
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    assert all(r.headers["x-prefix-version"] == str(r.json()["version"]) for r in rs)
    return [r.json()["version"] for r in rs]


async def test_a_split_on_two_replicas_sharing_one_redis(store, app_on, llama, tmp_path):
    for seed in (1, 2):
        await publish(store, llama, tmp_path, "alpha", seed)
    ids = [f"client-{i}" for i in range(24)]
    half = {1: 50, 2: 50}
    want = [_expected("alpha", half, rid) for rid in ids]
    assert set(want) == {1, 2}, "the ids fall on both versions"
    with live_server(app_on(llama)) as url_a, live_server(app_on(llama)) as url_b:
        async with (
            httpx.AsyncClient(base_url=url_a, timeout=30) as a,
            httpx.AsyncClient(base_url=url_b, timeout=30) as b,
        ):
            assert await _versions(b, ids[:4]) == [2] * 4, "B knows the task (and that it has no split)"
            r = await a.put("/v1/tasks/alpha/traffic", json={"weights": {"1": 50, "2": 50}})
            assert r.status_code == 200 and r.json()["traffic"] == {"1": 50, "2": 50}, r.text
            put_at = time.monotonic()
            while await _versions(b, ids) != want:  # B splits too once it hears the event
                assert time.monotonic() - put_at < 1.0, "B did not apply the split within a second"
                await asyncio.sleep(0.02)
            assert await _versions(a, ids) == want, "the same request id lands on the same version on A"
            assert await _versions(b, ids) == want, "... and again on B"
            assert (await b.get("/v1/tasks/alpha")).json()["traffic"] == {"1": 50, "2": 50}

            r = await a.post("/v1/generate", json={"task": "alpha@2", "input_ids": [5], "max_new_tokens": 1})
            assert r.json()["version"] == 2, "a pin is not split"
            errors = {
                (await a.put("/v1/tasks/alpha/traffic", json={"weights": {"1": 1, "7": 1, "9": 0}})): (
                    404,
                    "task 'alpha' has no versions 7, 9",
                ),
                (await a.put("/v1/tasks/nope/traffic", json={"weights": {"1": 1}})): (404, "'nope' not found"),
                (await a.put("/v1/tasks/alpha/traffic", json={"weights": {"1": 0}})): (422, "sum to 0"),
                (await a.put("/v1/tasks/alpha/traffic", json={"weights": {"0": 1}})): (422, "weights.0"),
                (await a.put("/v1/tasks/alpha/traffic", json={"weights": {"1": -1}})): (422, "weights.1"),
                (await a.put("/v1/tasks/alpha/traffic", json={"weights": {str(v): 1 for v in range(1, 18)}})): (
                    422,
                    "at most 16",
                ),
            }
            for r, (status, message) in errors.items():
                assert r.status_code == status and message in r.json()["error"]["message"], r.text
            r = await a.delete("/v1/tasks/alpha", params={"version": 1})
            assert r.status_code == 409, r.text
            assert "version 1 of 'alpha' is named by its traffic split (v1: 50, v2: 50)" in r.json()["error"]["message"]

            assert (await b.delete("/v1/tasks/alpha/traffic")).status_code == 204
            gone_at = time.monotonic()
            while set(await _versions(a, ids)) != {2}:  # back to the current version only, on both
                assert time.monotonic() - gone_at < 1.0, "A did not drop the split within a second"
                await asyncio.sleep(0.02)
            assert set(await _versions(b, ids)) == {2} and (await a.get("/v1/tasks/alpha")).json()["traffic"] is None
            assert (await a.delete("/v1/tasks/nope/traffic")).status_code == 404


async def test_a_split_survives_a_restart_and_goes_with_a_rollback(store, app_on, llama, tmp_path):
    for seed in (1, 2, 3):
        await publish(store, llama, tmp_path, "alpha", seed)
    ids = [f"r{i}" for i in range(16)]
    split = {1: 1, 3: 3}
    async with asgi_client(app_on(llama)) as c:
        r = await c.put("/v1/tasks/alpha/traffic", json={"weights": {"1": 1, "3": 3}})
        assert r.status_code == 200
    app = app_on(llama)
    async with asgi_client(app) as c:  # a new process: the split is read from Redis
        assert (await c.get("/v1/tasks/alpha")).json()["traffic"] == {"1": 1, "3": 3}
        assert await _versions(c, ids) == [_expected("alpha", split, rid) for rid in ids]
        assert (await c.delete("/v1/tasks/alpha", params={"version": 2})).status_code == 204, "not in the split"
        r = await c.post("/v1/tasks/alpha/rollback", json={"version": 1})
        assert r.status_code == 200
        assert (await c.get("/v1/tasks/alpha")).json()["traffic"] is None, "a rollback clears the split"
        await _until(lambda: app.state.services.host_cache.traffic.get("alpha", 0) is None)
        assert set(await _versions(c, ids)) == {1}
        await c.put("/v1/tasks/alpha/traffic", json={"weights": {"1": 1, "3": 1}})
        assert (await c.delete("/v1/tasks/alpha")).status_code == 204
        await store.put(await _artifact(store, llama, tmp_path))
        assert (await c.get("/v1/tasks/alpha")).json()["traffic"] is None, "deleting the task deleted its split"


async def test_a_stale_split_naming_a_deleted_version_falls_back(store, app_on, llama, tmp_path):
    for seed in (1, 2):
        await publish(store, llama, tmp_path, "alpha", seed)
    await store.set_traffic("alpha", {2: 1})  # a split that drops v1 ...
    await store.delete("alpha", 1)  # ... then v1 deleted
    app = app_on(llama)
    async with asgi_client(app) as c:
        cache = app.state.services.host_cache
        cache.current["alpha"], cache.traffic["alpha"] = 2, {1: 1}  # a replica that has not heard the events yet
        assert await _versions(c, ["x", "y"]) == [2, 2], "re-read the routing: not a 404"
        assert cache.traffic["alpha"] == {2: 1}, "and keeps what it read"
        r = await c.post("/v1/generate", json={"task": "alpha@1", "input_ids": [5], "max_new_tokens": 1})
        assert r.status_code == 404 and "has no version 1" in r.text, "a pinned version that is gone stays a 404"


async def _artifact(store, llama, tmp_path):
    pm = trained_peft(llama, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), seed=9)
    pm.save_pretrained(tmp_path / "again")
    return import_peft_dir(tmp_path / "again", task="alpha", backbone=BackboneFingerprint.from_config(llama.config))


async def _until(condition, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# -- warm tasks -----------------------------------------------------------------------------------------------------
BLOCK_BYTES = (
    2 * 3 * 2 * 8 * 4 * 4
)  # one pool block of the tiny Llama: keys and values, 3 layers, 2 x 8, fp32, 4 tokens


async def test_preloaded_tasks_are_resident_when_ready(store, app_on, llama, tmp_path, caplog, monkeypatch):
    for task in ("hot-a", "hot-b", "cold"):
        await publish(store, llama, tmp_path, task, 1)
    real_get = PrefixStore.get

    async def slow_get(self, task, version=None):  # a slow Redis: the warm-up takes a while
        await asyncio.sleep(0.2)
        return await real_get(self, task, version)

    monkeypatch.setattr(PrefixStore, "get", slow_get)
    app = app_on(llama, preload_tasks="hot-*,nothing-matches")
    async with asgi_client(app) as c:
        seen = set()
        while (r := await c.get("/ready")).status_code != 200:
            seen.add(r.json()["checks"]["warm"])
            await asyncio.sleep(0.005)
        assert "loading 1/2 tasks" in seen, seen  # 503 while loading (a server without keys is all admin: the text)
        assert seen <= {"loading 0/0 tasks", "loading 0/2 tasks", "loading 1/2 tasks"}, seen
        engine = app.state.services.engine
        assert engine.is_resident("hot-a", 1) and engine.is_resident("hot-b", 1) and not engine.is_resident("cold", 1)
        assert r.json()["checks"]["warm"] is True and not engine.pins, "preloaded, not pinned"
    app = app_on(llama, preload_tasks="hot-*", device_cache_bytes=BLOCK_BYTES)  # room for one
    async with asgi_client(app) as c:
        while (await c.get("/ready")).status_code != 200:
            await asyncio.sleep(0.005)
        engine = app.state.services.engine
        assert engine.is_resident("hot-a", 1) and not engine.is_resident("hot-b", 1)
    assert "device prefix cache is full: preloaded 1 of 2 tasks; 'hot-b' stay cold" in caplog.text


async def test_a_pinned_task_stays_resident_on_every_replica(store, app_on, llama, tmp_path):
    tasks = ("alpha", "beta", "gamma", "delta", "eps")
    for task in tasks:
        await publish(store, llama, tmp_path, task, 1)
    fp = BackboneFingerprint.from_config(llama.config)
    await store.put(make_artifact("big", fp=fp, P=12))  # 3 blocks: fits the cache, not beside 2 blocks of pins
    await store.put(make_artifact("huge", fp=fp, P=20))  # 5 blocks: more than the whole cache
    budget = {"device_cache_bytes": 4 * BLOCK_BYTES}  # four prefixes of 4 tokens; pins may hold two

    def gen(task):
        return {"task": task, "input_ids": [5, 6], "max_new_tokens": 1}

    app_a, app_b = app_on(llama, **budget), app_on(llama, **budget)
    async with asgi_client(app_a) as a, asgi_client(app_b) as b:
        ea, eb = app_a.state.services.engine, app_b.state.services.engine
        r = await a.post("/v1/tasks/alpha/pin")
        assert r.status_code == 200 and r.json() == {"task": "alpha", "version": 1, "pinned": True, "bytes": 1536}
        detail = (await a.get("/v1/tasks/alpha")).json()
        assert detail["pinned"] is True and detail["pinned_here"] is True
        await _until(lambda: eb.pins == {"alpha": 1})  # B heard the pin and loaded it
        assert (await b.get("/v1/tasks/alpha")).json()["pinned_here"] is True
        for client, engine in ((a, ea), (b, eb)):
            for task in ("beta", "gamma", "delta", "eps", "beta", "gamma"):  # three rooms left: each evicts
                assert (await client.post("/v1/generate", json=gen(task))).status_code == 200
            assert engine.is_resident("alpha", 1) and not engine.is_resident("delta", 1)
            assert engine.device_cache.stats["evictions"] >= 3

        assert (await a.post("/v1/tasks/beta/pin")).status_code == 200
        r = await a.post("/v1/tasks/gamma/pin")
        assert r.status_code == 507, r.text
        message = r.json()["error"]["message"]
        assert f"needs {BLOCK_BYTES} bytes of the device prefix cache; other pins hold {2 * BLOCK_BYTES} of the" in (
            message
        )
        assert "0 left" in message and "PREFIXSERVE_PIN_FRACTION" in message
        assert (await a.get("/v1/tasks/gamma")).json()["pinned"] is False
        assert (await a.post("/v1/tasks/nope/pin")).status_code == 404
        for task in ("gamma", "delta", "eps"):  # the half pins leave serves every other task
            assert (await a.post("/v1/generate", json=gen(task))).status_code == 200
        r = await a.post("/v1/generate", json=gen("big"))
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        assert "the room is held by pinned tasks; retry" in r.json()["error"]["message"]
        r = await a.post("/v1/generate", json=gen("huge"))
        assert r.status_code == 400 and "it does not fit the device cache at all" in r.text

        assert (await b.delete("/v1/tasks/beta/pin")).status_code == 204
        await _until(lambda: ea.pins == {"alpha": 1} and eb.pins == {"alpha": 1})
        assert (await a.post("/v1/generate", json=gen("big"))).status_code == 200  # beta, unpinned, made room
        assert not ea.is_resident("beta", 1) and (await a.get("/v1/tasks/beta")).json()["pinned"] is False

        await publish(store, llama, tmp_path, "alpha", 2)  # the pin follows the current version
        await _until(lambda: ea.pins == {"alpha": 2} and eb.pins == {"alpha": 2})
        assert ea.is_resident("alpha", 2) and eb.is_resident("alpha", 2)
        text = (await b.get("/metrics", params={"name[]": "prefixserve_task_pinned"})).text
        assert 'prefixserve_task_pinned{task="alpha"} 1.0' in text

    app_c = app_on(llama, **budget)  # a restart: the pin is read from Redis before /ready answers 200
    async with asgi_client(app_c) as c:
        while (await c.get("/ready")).status_code != 200:
            await asyncio.sleep(0.005)
        assert app_c.state.services.engine.pins == {"alpha": 2}
        assert (await c.delete("/v1/tasks/alpha")).status_code == 204
        await _until(lambda: app_c.state.services.engine.pins == {})
