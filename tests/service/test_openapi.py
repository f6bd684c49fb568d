"""The OpenAPI schema: complete, an example for every route (every request body and JSON answer), /docs renders
offline from local assets; schemathesis finds no 5xx; the official openai client completes and streams against a
running server."""

import asyncio
import copy
import re
import uuid

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from peft import PrefixTuningConfig

from prefix_store import PrefixStore, connect
from service.app import create_app
from service.auth import required_scope
from service.runtime import wrap_model
from service.settings import ServiceSettings
from tests.engine_harness import publish_peft, trained_peft
from tests.models import tiny_model, tiny_tokenizer
from tests.service.live import live_server

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def server(redis_server, tmp_path_factory):
    """A live server on a tiny Llama with one published task, shared by the tests of this module."""
    base = tiny_model("llama")
    ns = f"openapi-{uuid.uuid4().hex[:8]}"

    async def publish():
        store = PrefixStore(connect(redis_server.url), namespace=ns)
        pm = trained_peft(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), seed=1)
        await publish_peft(store, pm, "alpha", base.config, tmp_path_factory.mktemp("alpha"))
        await store.aclose()

    asyncio.run(publish())
    s = ServiceSettings(redis_url=redis_server.url, namespace=ns, max_queue=4096, request_timeout_s=30)
    app = create_app(s, backbone=wrap_model(copy.deepcopy(base), tiny_tokenizer(), name="tiny-llama"))
    with live_server(app) as url:
        yield url


def _has_example(node, components) -> bool:
    if isinstance(node, dict):
        if "example" in node or "examples" in node:
            return True
        ref = node.get("$ref")
        if ref and _has_example(components.get(ref.rsplit("/", 1)[-1], {}), components):
            return True
        return any(_has_example(v, components) for v in node.values())
    if isinstance(node, list):
        return any(_has_example(v, components) for v in node)
    return False


def test_every_route_is_documented_with_an_example(server):
    spec = httpx.get(f"{server}/openapi.json").json()
    components = spec["components"]["schemas"]
    expected = {
        ("/v1/generate", "post"),
        ("/v1/classify", "post"),
        ("/v1/completions", "post"),
        ("/v1/models", "get"),
        ("/v1/tasks", "get"),
        ("/v1/tasks/{task}", "get"),
        ("/v1/tasks/{task}", "put"),
        ("/v1/tasks/{task}", "delete"),
        ("/v1/tasks/{task}/rollback", "post"),
        ("/health", "get"),
        ("/ready", "get"),
        ("/metrics", "get"),
        ("/v1/keys", "post"),
        ("/v1/keys", "get"),
        ("/v1/keys/{name}", "get"),
        ("/v1/keys/{name}", "delete"),
    }
    ops = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert expected <= ops
    for path, method in ops:
        op = spec["paths"][path][method]
        assert op.get("summary"), (path, method)
        assert _has_example({k: op.get(k) for k in ("requestBody", "responses", "parameters")}, components), (
            f"{method.upper()} {path} has no example"
        )
    docs = httpx.get(f"{server}/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text


def test_openai_client_completes_and_streams(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    models = [m.id for m in client.models.list()]
    assert models == ["base", "alpha"]
    done = client.completions.create(model="alpha", prompt="w5 w6 w7", max_tokens=5, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop") and done.usage.completion_tokens >= 1
    pieces = list(client.completions.create(model="alpha", prompt="w5 w6 w7", max_tokens=5, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == done.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="w5", max_tokens=2)


def test_schemathesis_finds_no_server_errors(server):
    # Driven through Hypothesis directly: schemathesis' pytest plugin does not run under pytest 9.
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    failures, calls = [], {}
    for result in schema.get_all_operations():
        op = result.ok()

        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def call(case):
            response = case.call(timeout=60)
            calls.setdefault(f"{case.method} {case.path}", []).append(response.status_code)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.path} {case.body!r:.200}: {response.status_code} {response.text[:200]}"
                )

        call()
    assert not failures, "\n".join(failures[:10])
    assert len(calls) >= 12 and sum(len(codes) for codes in calls.values()) > 150, {k: len(v) for k, v in calls.items()}
    assert any(code < 300 for codes in calls.values() for code in codes)


def _top_example(media, components) -> bool:
    """Whether a request or response body carries a whole example (a field's example alone does not count)."""
    schema = media.get("schema") or {}
    if "$ref" in schema:
        schema = components.get(schema["$ref"].rsplit("/", 1)[-1], {})
    return any(key in node for node in (media, schema) for key in ("example", "examples"))


def test_every_request_body_and_json_answer_has_an_example(server):
    spec = httpx.get(f"{server}/openapi.json").json()
    components = spec["components"]["schemas"]
    missing, bodies = [], 0
    for path, item in spec["paths"].items():
        for method, op in item.items():
            for content_type, media in (op.get("requestBody") or {}).get("content", {}).items():
                bodies += 1
                if not _top_example(media, components):
                    missing.append(f"{method.upper()} {path}: request body ({content_type})")
            for status, answer in op.get("responses", {}).items():
                media = answer.get("content", {}).get("application/json")
                if status.startswith("2") and media is not None and not _top_example(media, components):
                    missing.append(f"{method.upper()} {path}: {status} answer")
    assert bodies >= 12  # /tokenize, /detokenize and the upload route among them
    assert not missing, "no example:\n" + "\n".join(missing)


def test_docs_are_served_offline(server):
    page = httpx.get(f"{server}/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert not re.search(r"https?://", page.text), "/docs must name no external URL: it would be blank offline"
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    types = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
    assert sorted(a.rsplit(".", 1)[-1] for a in assets) == ["css", "js", "png"], assets
    for path in assets:
        r = httpx.get(server + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(types["." + path.rsplit(".", 1)[-1]])
        assert len(r.content) > 500, path
    assert "SwaggerUIBundle" in httpx.get(server + next(a for a in assets if a.endswith(".js"))).text
    for path in ("/docs/assets/index.html", "/docs/assets/..%2F..%2Fapp.py", "/redoc"):
        assert httpx.get(server + path).status_code == 404, path
    # open like /docs itself, whatever keys the server has
    assert required_scope("/docs") is None and required_scope("/docs/assets/swagger-ui.css") is None
    assert required_scope("/docsx") == "inference"
