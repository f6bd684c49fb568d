"""A request's way down (routes.common.Call): its task resolved once for all its inputs and choices, one
EngineRequest per engine request, and the metrics kept once for every route, streamed or not."""

import copy
import json

import pytest
from peft import PrefixTuningConfig
from prometheus_client import generate_latest

import service.runtime.scheduler as scheduler_module
from service.app import create_app
from service.runtime import wrap_model
from service.settings import ServiceSettings
from tests.engine_harness import publish_peft, trained_peft
from tests.models import tiny_model, tiny_tokenizer
from tests.service.live import asgi_client

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture
async def app(redis_url, store, llama, tmp_path):
    pm = trained_peft(llama, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), seed=1)
    await publish_peft(store, pm, "alpha", llama.config, tmp_path / "alpha")
    s = ServiceSettings(redis_url=redis_url, namespace=store.ns)
    return create_app(s, backbone=wrap_model(copy.deepcopy(llama), tiny_tokenizer(), name="tiny-llama"))


def _sse(text: str) -> list:
    return [json.loads(b[len("data: ") :]) for b in text.strip().split("\n\n") if b != "data: [DONE]"]


async def test_one_lookup_and_one_engine_request_per_request(app, monkeypatch):
    """Two prompts with three choices each: one host-cache lookup for the call, one EngineRequest per choice."""
    built = []
    real = scheduler_module.EngineRequest

    def counting(*a, **kw):
        built.append(real(*a, **kw))
        return built[-1]

    monkeypatch.setattr(scheduler_module, "EngineRequest", counting)
    async with asgi_client(app) as c:
        host_cache = app.state.services.host_cache
        lookups = []
        real_get = host_cache.get

        async def get(task, version=None):
            lookups.append((task, version))
            return await real_get(task, version)

        monkeypatch.setattr(host_cache, "get", get)
        body = {"model": "alpha", "prompt": [[5, 6], [7, 8, 9]], "max_tokens": 3, "n": 3, "seed": 1}
        r = await c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 6
    assert lookups == [("alpha", None)]
    assert len(built) == 6 and len({e.request_id for e in built}) == 6
    assert {e.artifact.version for e in built} == {1}
    assert [e.group is not None for e in built] == [False, True, True, False, True, True]


async def test_streamed_and_json_outputs_are_counted_and_timed_once(app):
    async with asgi_client(app) as c:
        generated = 0
        r = await c.post(
            "/v1/generate",
            json={"task": "alpha", "input_ids": [5, 6], "max_new_tokens": 3, "ignore_eos": True, "stream": True},
        )
        assert r.status_code == 200, r.text
        generated += _sse(r.text)[-1]["usage"]["completion_tokens"]
        body = {"model": "alpha", "prompt": [5], "max_tokens": 2, "n": 2, "stream": True}
        r = await c.post("/v1/completions", json={**body, "stream_options": {"include_usage": True}})
        assert r.status_code == 200, r.text
        generated += _sse(r.text)[-1]["usage"]["completion_tokens"]
        r = await c.post("/v1/generate", json={"task": "alpha", "input_ids": [5], "max_new_tokens": 2, "n": 2})
        assert r.status_code == 200, r.text
        generated += r.json()["usage"]["completion_tokens"]
        r = await c.post("/v1/generate", json={"task": "nope", "input_ids": [5], "max_new_tokens": 2})
        assert r.status_code == 404
        text = generate_latest(app.state.services.metrics.registry).decode()
    assert f'prefixserve_generated_tokens_total{{task="alpha"}} {float(generated)}' in text
    assert generated >= 3 + 2
    assert "prefixserve_time_to_first_token_seconds_count 3.0" in text  # one per request that got outputs
    assert 'task="nope"' not in text and 'route="/v1/generate",status="404",task="unknown"' in text
