"""Optional tracing with the OpenTelemetry SDK's in-memory exporter: one server span per HTTP request, named by its
route, with the status and the request id (refusals by the guard included), and one span per engine step; nothing
is recorded when tracing is off. The app is reached through the ASGI transport (no socket)."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.runtime import tracing
from tests.models import tiny_model, tiny_tokenizer
from tests.service.live import asgi_client
from tests.service.test_inference_api import make_app  # noqa: F401 (fixture)

pytestmark = pytest.mark.redis


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.install(None)


async def test_routes_and_engine_steps_are_traced(make_app, spans):  # noqa: F811
    async with asgi_client(make_app(tiny_model("llama"), tiny_tokenizer(), api_keys=["k"]), timeout=30) as c:
        auth = {"authorization": "Bearer k", "x-request-id": "trace-me"}
        body = {"task": "base", "prompt": "w5 w6", "max_new_tokens": 3}
        assert (await c.post("/v1/generate", json=body, headers=auth)).status_code == 200
        assert (await c.post("/v1/generate", json=body)).status_code == 401
    finished = spans.get_finished_spans()
    http = [s for s in finished if s.name.startswith("POST ")]
    assert [s.name for s in http] == ["POST /v1/generate", "POST /v1/generate"]
    assert http[0].attributes["http.response.status_code"] == 200
    assert http[0].attributes["prefixserve.request_id"] == "trace-me"
    assert http[1].attributes["http.response.status_code"] == 401
    steps = [s for s in finished if s.name == "engine.step"]
    assert len(steps) >= 3 and sum(s.attributes["prefixserve.admitted"] for s in steps) == 1
    assert max(s.attributes["prefixserve.running"] for s in steps) == 1


async def test_nothing_is_traced_when_off(make_app):  # noqa: F811
    exporter = InMemorySpanExporter()
    TracerProvider().add_span_processor(SimpleSpanProcessor(exporter))  # built but not installed
    assert not tracing.enabled()
    async with asgi_client(make_app(tiny_model("llama"), tiny_tokenizer()), timeout=30) as c:
        assert (await c.get("/health")).status_code == 200
    assert exporter.get_finished_spans() == ()


def test_an_endpoint_turns_tracing_on():
    from service.settings import ServiceSettings
    from service.tracing import setup

    setup(ServiceSettings())
    assert not tracing.enabled()
    try:
        setup(ServiceSettings(otel_endpoint="http://127.0.0.1:9/v1/traces", otel_service_name="ps-test"))
        assert tracing.enabled()
        assert tracing._provider.resource.attributes["service.name"] == "ps-test"
    finally:
        tracing.install(None)
