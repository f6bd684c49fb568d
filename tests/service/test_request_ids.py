"""Request ids over real HTTP: the client's X-Request-ID (or a new one) comes back in the response header, in
error bodies (the guard's refusals included) and in every log line of the request, text or JSON."""

from __future__ import annotations

import io
import json
import logging
import re

import httpx
import pytest

from service.request_ids import JsonFormatter, RequestIdFilter
from tests.models import tiny_model, tiny_tokenizer
from tests.service.live import live_server
from tests.service.test_inference_api import make_app  # noqa: F401 (fixture)

pytestmark = pytest.mark.redis


@pytest.fixture
def captured():
    """The JSON lines uvicorn's access log and the service write while the test runs."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    loggers = [logging.getLogger(n) for n in ("uvicorn.access", "service")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    yield out
    for lg, level in zip(loggers, levels, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)


async def test_ids_in_headers_errors_and_logs(make_app, captured):  # noqa: F811
    app = make_app(tiny_model("llama"), tiny_tokenizer(), api_keys=["k1"])
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            auth = {"authorization": "Bearer k1"}
            r = await c.post(
                "/v1/generate", json={"task": "nope", "prompt": "w5"}, headers={**auth, "x-request-id": "abc-123"}
            )
            assert r.status_code == 404 and r.headers["x-request-id"] == "abc-123"
            assert r.json()["error"]["request_id"] == "abc-123"
            r = await c.post("/v1/generate", json={"task": "base", "prompt": "w5"}, headers={"x-request-id": "no-key"})
            assert r.status_code == 401 and r.json()["error"]["request_id"] == "no-key"  # refused before any route
            r = await c.get("/health", headers={"x-request-id": "bad id\\nforged line"})
            generated = r.headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{32}", generated), generated
            r = await c.post("/v1/generate", json={"task": "base", "prompt": "w5", "max_new_tokens": 2}, headers=auth)
            assert r.status_code == 200 and re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
            ok_id = r.headers["x-request-id"]
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    by_id = {line["request_id"] for line in lines if line["logger"] == "uvicorn.access"}
    assert {"abc-123", "no-key", generated, ok_id} <= by_id, lines
    assert all(set(line) >= {"time", "level", "logger", "message", "request_id"} for line in lines)
