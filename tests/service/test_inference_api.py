"""The inference API on a real Redis and tiny backbones: generation (JSON and SSE), classification, OpenAI-compatible
completions, every error status, auth, metrics, disconnects. Plain request/response checks reach the app through the
ASGI transport (no socket); streaming, queue limits, deadlines and disconnects go over real HTTP (uvicorn in a
thread)."""

import asyncio
import copy
import json
import time

import httpx
import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig

from prefix_store import BackboneFingerprint, connect, encode
from service.app import create_app
from service.runtime import wrap_model
from service.settings import ServiceSettings
from tests.engine_harness import publish_peft, trained_peft
from tests.factories import make_artifact
from tests.models import tiny_model, tiny_tokenizer
from tests.service.live import asgi_client, live_server

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture
def make_app(redis_url, store):
    """An app on the test's Redis namespace (so `store` sees what it sees) around a copy of `model`."""

    def make(model, tokenizer=None, name="tiny-llama", **settings):
        s = ServiceSettings(redis_url=redis_url, namespace=store.ns, **settings)
        return create_app(s, backbone=wrap_model(copy.deepcopy(model), tokenizer, name=name))

    return make


async def publish_gen(store, base, tmp_path, task, P=4, seed=1, cls=PrefixTuningConfig):
    pm = trained_peft(base, cls(task_type="CAUSAL_LM", num_virtual_tokens=P), seed=seed)
    return await publish_peft(store, pm, task, base.config, tmp_path / f"{task}-{seed}")


def sse_events(text: str) -> list[dict]:
    out = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


async def test_generate_json_and_sse(store, make_app, llama, tmp_path):
    await publish_gen(store, llama, tmp_path, "alpha")
    with live_server(make_app(llama, tiny_tokenizer())) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            body = {"task": "alpha", "prompt": "w5 w6 w7", "max_new_tokens": 6, "logprobs": True}
            r = await c.post("/v1/generate", json=body)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["task"] == "alpha" and out["version"] == 1 and len(out["token_ids"]) == 6
            assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
            assert out["finish_reason"] in ("length", "stop") and len(out["logprobs"]) == 6
            same = (await c.post("/v1/generate", json={**body, "prompt": None, "input_ids": [5, 6, 7]})).json()
            assert same["token_ids"] == out["token_ids"]

            r = await c.post("/v1/generate", json={**body, "stream": True})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r.text)
            tokens, final = events[:-1], events[-1]
            assert [e["token_id"] for e in tokens] == out["token_ids"]
            assert "".join(e["text"] for e in tokens) == out["text"]
            assert final["finish_reason"] == out["finish_reason"] and final["usage"] == out["usage"]
            assert final["version"] == 1

            base = await c.post("/v1/generate", json={"task": "base", "input_ids": [5, 6], "max_new_tokens": 2})
            assert base.status_code == 200 and base.json()["version"] is None


async def test_generate_errors(store, make_app, llama, tmp_path):
    await publish_gen(store, llama, tmp_path, "alpha", P=4)
    # A prefix for another geometry that bypassed the upload check (written straight to the store).
    await store.put(make_artifact("alien", fp=BackboneFingerprint("llama", 3, 64, 8, 4, 8, 128)))
    async with asgi_client(make_app(llama, tiny_tokenizer()), timeout=30) as c:

        async def post(**body):
            r = await c.post("/v1/generate", json={"task": "alpha", "input_ids": [5, 6], **body})
            return r.status_code, r.json()["error"]["message"] if r.status_code >= 400 else r.json()

        status, msg = await post(prompt="w5")
        assert status == 422 and "exactly one of 'prompt' and 'input_ids'" in msg
        status, msg = await post(input_ids=None)
        assert status == 422
        status, msg = await post(max_new_tokens=0)
        assert status == 422 and "max_new_tokens" in msg
        status, msg = await post(temperature=-1)
        assert status == 422 and "temperature" in msg
        status, msg = await post(input_ids=[5, 999])
        assert status == 422 and "[0, 128)" in msg
        status, msg = await post(task="missing")
        assert status == 404 and "'missing' not found" in msg
        status, msg = await post(task="Bad Name")
        assert status == 400 and "lower-case" in msg
        status, msg = await post(input_ids=[5] * 200, max_new_tokens=60)
        assert status == 400 and "exceeds the context window of 256" in msg
        status, msg = await post(task="alien")
        assert status == 409 and "num_kv_heads" in msg
        status, msg = await post(stream=True, task="missing")
        assert status == 404  # errors before the first token keep their status when streaming
        status, msg = await post(logit_bias={"5": 1})  # unknown fields are refused by name, never dropped
        assert status == 422 and "logit_bias" in msg, msg
        status, msg = await post(n=9)
        assert status == 422 and "n: expected at most 8 (PREFIXSERVE_MAX_N), got 9" in msg, msg
        status, msg = await post(min_tokens=20, max_new_tokens=4)
        assert status == 422 and "min_tokens" in msg, msg
        r = await c.post("/v1/completions", json={"model": "alpha", "prompt": "w5", "best_of": 2})
        assert r.status_code == 400 and "best_of" in r.json()["error"]["message"], r.text  # OpenAI's status
        r = await c.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["type"] == "RequestValidationError"


async def test_queue_full_and_deadline(store, make_app, llama, tmp_path):
    await publish_gen(store, llama, tmp_path, "alpha")
    with live_server(make_app(llama, max_queue=1, max_batch_size=1)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            body = {"task": "alpha", "input_ids": [5, 6], "max_new_tokens": 40}
            rs = await asyncio.gather(*(c.post("/v1/generate", json=body) for _ in range(12)))
            codes = [r.status_code for r in rs]
            assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
            full = next(r for r in rs if r.status_code == 429)
            assert full.headers["retry-after"] == "1" and "queue full" in full.json()["error"]["message"]
    with live_server(make_app(llama, request_timeout_s=0.0001)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            r = await c.post("/v1/generate", json={"task": "base", "input_ids": [5], "max_new_tokens": 200})
            assert r.status_code == 504 and "deadline" in r.json()["error"]["message"]


async def test_store_down_is_503_for_uncached_tasks_only(llama):
    s = ServiceSettings(redis_url="redis://127.0.0.1:1", namespace="x")
    app = create_app(s, backbone=wrap_model(copy.deepcopy(llama), None, name="t"))
    async with asgi_client(app, timeout=60) as c:
        r = await c.post("/v1/generate", json={"task": "alpha", "input_ids": [5], "max_new_tokens": 2})
        assert r.status_code == 503 and "Redis unreachable" in r.json()["error"]["message"]
        r = await c.post("/v1/generate", json={"task": "base", "input_ids": [5], "max_new_tokens": 2})
        assert r.status_code == 200


async def test_concurrent_requests_over_eight_tasks_equal_their_solo_results(store, make_app, llama, tmp_path):
    tasks = [f"t{i}" for i in range(8)]
    for i, t in enumerate(tasks):
        await publish_gen(
            store, llama, tmp_path, t, P=2 + i, seed=i, cls=PromptTuningConfig if i % 3 == 0 else PrefixTuningConfig
        )
    torch.manual_seed(0)
    bodies = [
        {"task": tasks[i % 8], "input_ids": torch.randint(3, 120, (3 + i % 5,)).tolist(), "max_new_tokens": 5}
        for i in range(32)
    ]
    async with asgi_client(make_app(llama, max_batch_size=32), timeout=60) as c:
        solo = [(await c.post("/v1/generate", json=b)).json()["token_ids"] for b in bodies]
        together = await asyncio.gather(*(c.post("/v1/generate", json=b) for b in bodies))
    assert [r.json()["token_ids"] for r in together] == solo


async def test_upload_then_use_rollback_and_delete_are_seen(store, make_app, llama, tmp_path):
    first = trained_peft(llama, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), seed=1)
    first.save_pretrained(tmp_path / "v1")
    second = trained_peft(llama, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5), seed=2)
    second.save_pretrained(tmp_path / "v2")

    def files(d):
        return {
            "adapter_config": (d / "adapter_config.json").read_bytes(),
            "adapter_model": (d / "adapter_model.safetensors").read_bytes(),
        }

    body = {"task": "fresh", "input_ids": [5, 6, 7], "max_new_tokens": 5}
    async with asgi_client(make_app(llama), timeout=30) as c:
        assert (await c.post("/v1/generate", json=body)).status_code == 404
        assert (await c.put("/v1/tasks/fresh", files=files(tmp_path / "v1"))).status_code == 201
        v1 = (await c.post("/v1/generate", json=body)).json()
        assert v1["version"] == 1
        assert (await c.put("/v1/tasks/fresh", files=files(tmp_path / "v2"))).json()["version"] == 2
        assert await _eventually(c, body, lambda out: out["version"] == 2)
        assert (await c.post("/v1/tasks/fresh/rollback", json={"version": 1})).status_code == 200
        back = await _eventually(c, body, lambda out: out["version"] == 1)
        assert back["token_ids"] == v1["token_ids"]
        listed = (await c.get("/v1/tasks")).json()["tasks"]
        assert listed[0]["task"] == "fresh" and listed[0]["resident"] is True
        assert (await c.delete("/v1/tasks/fresh")).status_code == 204
        for _ in range(100):
            if (await c.post("/v1/generate", json=body)).status_code == 404:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("delete not seen")
        assert (await c.put("/v1/tasks/base", files=files(tmp_path / "v1"))).status_code == 400


async def _eventually(c, body, cond):
    for _ in range(100):
        out = (await c.post("/v1/generate", json=body)).json()
        if cond(out):
            return out
        await asyncio.sleep(0.02)
    raise AssertionError(f"not seen: {out}")


async def test_disconnects_free_their_rows(store, make_app, redis_url, llama, tmp_path):
    await publish_gen(store, llama, tmp_path, "alpha")
    await publish_gen(store, llama, tmp_path, "cold", seed=3)
    app = make_app(llama, tiny_tokenizer())
    with live_server(app) as url:
        sched = app.state.services.scheduler
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            body = {"task": "alpha", "input_ids": [5, 6], "max_new_tokens": 240, "stop_token_ids": []}
            async with c.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        break  # read one token, then hang up
            await _until(lambda: sched.cancelled == 1 and sched.running == 0)
            # A non-streaming client that gives up: make its prefix load slow (Redis stalled by DEBUG SLEEP) so
            # it is certainly still waiting when the client hangs up.
            admin = connect(redis_url)
            stall = asyncio.create_task(admin.execute_command("DEBUG", "SLEEP", "1.5"))
            await asyncio.sleep(0.05)
            with pytest.raises(httpx.ReadTimeout):
                await c.post("/v1/generate", json={**body, "task": "cold"}, timeout=0.2)
            await stall
            await admin.aclose()
            await _until(lambda: sched.cancelled == 2 and sched.running == 0 and sched.queue_depth == 0)
            metrics = (await c.get("/metrics")).text
            assert "prefixserve_running_requests 0.0" in metrics


async def _until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_completions_and_models(store, make_app, llama, tmp_path):
    await publish_gen(store, llama, tmp_path, "alpha")
    tok = tiny_tokenizer()
    with live_server(make_app(llama, tok)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            models = (await c.get("/v1/models")).json()
            assert [m["id"] for m in models["data"]] == ["base", "alpha"] and models["object"] == "list"
            body = {"model": "alpha", "prompt": "w5 w6 w7", "max_tokens": 4, "temperature": 0, "logprobs": 1}
            out = (await c.post("/v1/completions", json=body)).json()
            choice = out["choices"][0]
            assert out["object"] == "text_completion" and out["usage"]["completion_tokens"] == 4
            assert len(choice["logprobs"]["token_logprobs"]) == 4
            gen = await c.post("/v1/generate", json={"task": "alpha", "prompt": "w5 w6 w7", "max_new_tokens": 4})
            assert choice["text"] == gen.json()["text"]
            multi = (await c.post("/v1/completions", json={**body, "prompt": ["w5 w6 w7", "w9"]})).json()
            assert [ch["index"] for ch in multi["choices"]] == [0, 1] and multi["choices"][0]["text"] == choice["text"]
            ids = (await c.post("/v1/completions", json={**body, "prompt": [[5, 6, 7], [9]]})).json()
            assert [ch["text"] for ch in ids["choices"]] == [ch["text"] for ch in multi["choices"]]
            r = await c.post("/v1/completions", json={**body, "stream": True})
            events = sse_events(r.text)
            assert events[-1] == "[DONE]"
            assert "".join(e["choices"][0]["text"] for e in events[:-1]) == choice["text"]
            assert events[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]
            two = (await c.post("/v1/completions", json={**body, "n": 2})).json()
            assert [ch["index"] for ch in two["choices"]] == [0, 1] and two["choices"][0]["text"] == choice["text"]
            assert (await c.post("/v1/completions", json={**body, "model": "nope"})).status_code == 404


@pytest.mark.peft_reference("seq_cls")
async def test_classification_api_on_an_encoder(store, make_app, tmp_path):
    bert = tiny_model("bert-cls")
    pm = trained_peft(bert, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4), seed=5)
    await publish_peft(store, pm, "sent", bert.config, tmp_path / "sent", labels=["neg", "neu", "pos"])
    with torch.no_grad():
        ref = torch.softmax(pm(input_ids=torch.tensor([[5, 6, 7]])).logits[0], -1)
    async with asgi_client(make_app(bert.bert, tiny_tokenizer(), name="tiny-bert"), timeout=30) as c:
        r = await c.post("/v1/classify", json={"task": "sent", "input_ids": [5, 6, 7]})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["version"] == 1 and set(out["results"][0]["scores"]) == {"neg", "neu", "pos"}
        got = torch.tensor([out["results"][0]["scores"][k] for k in ("neg", "neu", "pos")])
        assert (got - ref).abs().max() < 1e-5 and out["results"][0]["label"] == ["neg", "neu", "pos"][ref.argmax()]
        many = (await c.post("/v1/classify", json={"task": "sent", "texts": ["w5 w6 w7", "w9"]})).json()
        assert len(many["results"]) == 2 and many["results"][0]["label"] == out["results"][0]["label"]
        batched = many["results"][0]["scores"]  # batched with another row: equal up to float noise
        assert all(abs(batched[k] - v) < 1e-5 for k, v in out["results"][0]["scores"].items())
        pair = await c.post("/v1/classify", json={"task": "sent", "text": "w5", "text_pair": "w6 w7"})
        assert pair.status_code == 200
        for body, status, words in [
            ({"task": "sent", "text": "w5", "texts": ["w5"]}, 422, "exactly one of"),
            ({"task": "sent", "texts": []}, 422, "texts"),
            ({"task": "base", "text": "w5"}, 400, "no classification head"),
            ({"task": "nope", "text": "w5"}, 404, "not found"),
            ({"task": "sent", "text_pair": "w5", "input_ids": [5]}, 422, "text_pair"),
        ]:
            r = await c.post("/v1/classify", json=body)
            assert r.status_code == status and words in r.json()["error"]["message"], (body, r.text)
        gen = await c.post("/v1/generate", json={"task": "sent", "input_ids": [5], "max_new_tokens": 2})
        assert gen.status_code == 400 and "encoder" in gen.json()["error"]["message"]
        art = make_artifact("nohead", fp=BackboneFingerprint.from_config(bert.config))
        assert (await c.put("/v1/tasks/nohead", files={"artifact": encode(art)})).status_code == 201
        r = await c.post("/v1/classify", json={"task": "nohead", "text": "w5"})
        assert r.status_code == 400 and "no classification head" in r.json()["error"]["message"]


async def test_auth_matrix_and_metrics(store, make_app, llama, tmp_path):
    await publish_gen(store, llama, tmp_path, "alpha")
    app = make_app(llama, api_keys=["user"], admin_keys=["root"])
    user, root = {"Authorization": "Bearer user"}, {"Authorization": "Bearer root"}
    body = {"task": "alpha", "input_ids": [5, 6], "max_new_tokens": 3}
    generated = 0  # completions sample at temperature 1 and may stop at EOS early: count what was generated
    async with asgi_client(app, timeout=30) as c:
        for path, method, payload in [
            ("/v1/generate", "POST", body),
            ("/v1/models", "GET", None),
            ("/v1/completions", "POST", {"model": "alpha", "prompt": [5], "max_tokens": 2}),
            ("/v1/classify", "POST", {"task": "alpha", "input_ids": [5]}),
        ]:
            assert (await c.request(method, path, json=payload)).status_code == 401
            assert (
                await c.request(method, path, json=payload, headers={"Authorization": "Bearer x"})
            ).status_code == 401
            for key in (user, root):
                r = await c.request(method, path, json=payload, headers=key)
                assert r.status_code != 401
                if r.status_code == 200 and "usage" in r.json():
                    generated += r.json()["usage"]["completion_tokens"]
        for path in ["/v1/tasks", "/metrics"]:
            assert (await c.get(path, headers=user)).status_code == 403
            assert (await c.get(path, headers=root)).status_code == 200
        assert (await c.get("/health")).status_code == 200 and (await c.get("/ready")).status_code == 200
        text = (await c.get("/metrics", headers=root)).text
    for name in [
        'prefixserve_requests_total{route="/v1/generate",status="200",task="alpha"}',
        "prefixserve_request_latency_seconds_bucket",
        "prefixserve_time_to_first_token_seconds_count",
        "prefixserve_queue_depth",
        "prefixserve_batch_size_bucket",
        f'prefixserve_generated_tokens_total{{task="alpha"}} {float(generated)}',
        'prefixserve_prefix_cache_hits_total{tier="device"}',
        "prefixserve_prefix_cache_misses_total",
        "prefixserve_prefix_cache_evictions_total",
        'prefixserve_prefix_cache_resident_bytes{tier="host"}',
    ]:
        assert name in text, name
    assert generated >= 2 * 3 + 2 * 1  # two greedy generations of 3, two completions of at least one token


@pytest.mark.parametrize("family", ["gemma2", "cohere", "stablelm"])
async def test_families_with_windows_caps_and_scales_answer_over_http_as_peft_alone(store, make_app, family, tmp_path):
    """What a user saw over HTTP before these families were proven: 200 with wrong tokens or log-probabilities.
    Gemma 2 (sliding window of 6 under a 17-token row, attention and final soft-caps), Cohere (logit_scale),
    StableLM (layers that do not forward keyword arguments): an uploaded PEFT prefix task and the bare backbone give
    PEFT's / transformers' greedy tokens and log-probabilities, the prompt's echoed log-probabilities included."""
    from tests.families import family_model
    from tests.golden.cases import peft_generate

    base = family_model(family)
    pm = trained_peft(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5), seed=2)
    await publish_peft(store, pm, "t", base.config, tmp_path / "t")
    ids = [(7 * i + 3) % 120 + 3 for i in range(12)]
    async with asgi_client(make_app(base, name=family), timeout=30) as c:
        for task, model in (("t", pm), ("base", base)):
            body = {"task": task, "input_ids": ids, "max_new_tokens": 6, "logprobs": True, "ignore_eos": True}
            r = await c.post("/v1/generate", json=body)
            assert r.status_code == 200, r.text
            tokens, logits = peft_generate(model, ids)
            want = torch.log_softmax(logits.float(), -1)[range(6), tokens].tolist()
            assert r.json()["token_ids"] == tokens
            assert max(abs(a - b) for a, b in zip(r.json()["logprobs"], want)) <= 1e-4
        body = {"model": "base", "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 0}
        r = await c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        echoed = r.json()["choices"][0]["logprobs"]["token_logprobs"][: len(ids)]
        with torch.no_grad():
            full = torch.log_softmax(base(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        assert echoed[0] is None
        assert max(abs(echoed[j] - full[j - 1, ids[j]].item()) for j in range(1, len(ids))) <= 1e-4
