"""Issue 10: no valid prefix refused, and no client without a key able to exhaust the server. One test per finding,
on a real Redis: over real HTTP (uvicorn as `python -m service` runs it) where the finding is about connections,
bodies or time; through the ASGI transport (no socket) where it is about what a request gets back."""

import asyncio
import copy
import json
import logging
import selectors
import socket
import threading
import time

import httpx
import pytest
import redis
import torch

from prefix_store import BackboneFingerprint, encode
from service import __main__ as service_main
from service.app import create_app
from service.runtime import wrap_model
from service.server import LogRateLimit
from service.settings import ServiceSettings
from tests.factories import make_artifact
from tests.models import tiny_model, tiny_tokenizer
from tests.service.live import asgi_client, live_server

pytestmark = pytest.mark.redis
USER, ROOT = {"Authorization": "Bearer user"}, {"Authorization": "Bearer root"}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture
def app_for(redis_url, store, llama):
    def make(tokenizer=None, **settings):
        settings = {"api_keys": ["user"], "admin_keys": ["root"], **settings}
        s = ServiceSettings(redis_url=redis_url, namespace=store.ns, **settings)
        return create_app(s, backbone=wrap_model(copy.deepcopy(llama), tokenizer, name="tiny-llama"))

    return make


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _raw(port: int, data: bytes, *, then: bytes = b"", read_timeout: float = 10.0) -> bytes:
    """Sends `data` (and `then`, ignoring a server that already closed), returns what the server answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(data)
        try:
            if then:
                s.sendall(then)
        except OSError:
            pass  # the server answered and closed before reading everything: what we test for
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and b'"error"' in out:
                    break
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def _chunked(n_bytes: int, chunk: int = 65536) -> bytes:
    parts = []
    for start in range(0, n_bytes, chunk):
        size = min(chunk, n_bytes - start)
        parts.append(b"%x\r\n" % size + b"a" * size + b"\r\n")
    return b"".join(parts) + b"0\r\n\r\n"


# -- 1: valid artifacts whose header length starts like a pickle --------------------------------------------------
async def test_every_header_length_is_served_and_a_corrupt_stored_blob_is_a_500(app_for, store, llama, redis_url):
    """Before the fix, the upload whose stored blob began with 0x80 answered 201 and then 400 "got a pickle" on every
    request. 32 notes 8 bytes apart give 32 header lengths: every low byte a safetensors header length can have."""
    fp = BackboneFingerprint.from_config(llama.config)
    raw = redis.Redis.from_url(redis_url)
    async with asgi_client(app_for(), timeout=30, headers=ROOT) as c:
        first_bytes = set()
        for k in range(0, 256, 8):
            blob = encode(make_artifact(f"t{k}", fp=fp, training={"note": "x" * k}))
            r = await c.put(f"/v1/tasks/t{k}", files={"artifact": ("a.safetensors", blob)})
            assert r.status_code == 201, r.text
            first_bytes.add(raw.hget(store.keys.version(f"t{k}", 1), "blob")[0])
            r = await c.post("/v1/generate", json={"task": f"t{k}", "input_ids": [5, 6], "max_new_tokens": 2})
            assert r.status_code == 200, (k, r.text)
        assert 0x80 in first_bytes  # the case that used to break was exercised

        blob = encode(make_artifact("damaged", fp=fp))
        assert (await c.put("/v1/tasks/damaged", files={"artifact": ("a", blob)})).status_code == 201
        raw.hset(store.keys.version("damaged", 1), "blob", b"\x80garbage")  # a record damaged in the store
        r = await c.post("/v1/generate", json={"task": "damaged", "input_ids": [5], "max_new_tokens": 1})
        msg = r.json()["error"]["message"]
        assert r.status_code == 500 and "stored prefix 'damaged' v1 does not decode" in msg
        assert "prefixserve_store_decode_failures_total 1.0" in (await c.get("/metrics")).text
    raw.close()


# -- 2: auth before the body, every body bounded -----------------------------------------------------------------
async def test_auth_is_checked_before_the_body_and_bodies_are_cut_at_their_limit(app_for):
    with live_server(app_for(max_artifact_bytes=65536, body_timeout_s=1)) as url:
        port = _port(url)
        head = b"POST /v1/generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        # No key and a chunked body that never comes: the answer must not wait for it.
        start = time.monotonic()
        out = await asyncio.to_thread(_raw, port, head + b"Transfer-Encoding: chunked\r\n\r\n", read_timeout=5)
        assert _status(out) == 401 and time.monotonic() - start < 4
        # A key, and a chunked 4 MiB body: cut at the 1 MiB JSON limit.
        keyed = head + b"Authorization: Bearer user\r\nTransfer-Encoding: chunked\r\n\r\n"
        out = await asyncio.to_thread(_raw, port, keyed, then=_chunked(4 * 1024**2))
        assert _status(out) == 413 and b"exceeds the limit for /v1/generate of 1048576 bytes" in out
        # A declared length over the limit is refused before anything is read.
        out = await asyncio.to_thread(
            _raw, port, head + b"Authorization: Bearer user\r\nContent-Length: 9999999\r\n\r\n"
        )
        assert _status(out) == 413
        # An upload streamed in chunks past the artifact limit (64 KiB + 1 MiB of framing).
        upload = (
            b"PUT /v1/tasks/big HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer root\r\n"
            b"Content-Type: multipart/form-data; boundary=xx\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        body = b'--xx\r\nContent-Disposition: form-data; name="artifact"; filename="a"\r\n\r\n' + b"a" * 3 * 1024**2
        frame = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
        out = await asyncio.to_thread(_raw, port, upload, then=frame)
        assert _status(out) == 413
        # A body that stalls: 408 after body_timeout_s.
        out = await asyncio.to_thread(_raw, port, head + b"Authorization: Bearer user\r\nContent-Length: 100\r\n\r\n{")
        assert _status(out) == 408 and b"stalled" in out
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:  # and the server still serves
            r = await c.post("/v1/generate", json={"task": "base", "input_ids": [5], "max_new_tokens": 1}, headers=USER)
            assert r.status_code == 200


# -- 3: prompt bounds, tokenisation off the event loop -----------------------------------------------------------
class _RecordingTokenizer:
    """The tiny tokenizer, noting the thread each call ran on."""

    def __init__(self) -> None:
        self.tok = tiny_tokenizer()
        self.threads: list[str] = []

    def __call__(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return self.tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


async def test_prompts_are_bounded_and_tokenized_off_the_event_loop(app_for):
    tok = _RecordingTokenizer()
    loop_thread = threading.current_thread().name  # the app's event loop runs in the test's thread
    async with asgi_client(app_for(tok), timeout=30, headers=USER) as c:
        r = await c.post("/v1/completions", json={"model": "base", "prompt": "w5 " * 70_000, "max_tokens": 1})
        assert r.status_code == 400 and "at most 200000 characters" in r.json()["error"]["message"]
        r = await c.post("/v1/completions", json={"model": "base", "prompt": ["w5"] * 65, "max_tokens": 1})
        assert r.status_code == 400 and "at most 64 items" in r.json()["error"]["message"]
        r = await c.post("/v1/completions", json={"model": "base", "prompt": [[5]] * 65, "max_tokens": 1})
        assert r.status_code == 400
        r = await c.post("/v1/completions", json={"model": "base", "prompt": "w5 w6", "max_tokens": 1})
        assert r.status_code == 200
        r = await c.post("/v1/generate", json={"task": "base", "prompt": "w5 w6", "max_new_tokens": 1})
        assert r.status_code == 200
    assert tok.threads and loop_thread not in tok.threads, tok.threads


# -- 4: bounded metric labels, bounded error bodies --------------------------------------------------------------
async def test_metric_labels_name_only_tasks_that_exist(app_for, store, llama):
    await store.put(make_artifact("real", fp=BackboneFingerprint.from_config(llama.config)))
    async with asgi_client(app_for(), timeout=30, headers=ROOT) as c:
        for i in range(40):
            r = await c.post("/v1/generate", json={"task": f"ghost-{i}", "input_ids": [5], "max_new_tokens": 1})
            assert r.status_code == 404
        r = await c.post("/v1/generate", json={"task": "real", "input_ids": [5], "max_new_tokens": 1})
        assert r.status_code == 200
        huge = "x" * 100_000
        r = await c.post("/v1/generate", json={"task": huge, "input_ids": [5], "max_new_tokens": 1})
        assert r.status_code == 422 and len(r.content) < 1000, "a huge input is not echoed back"
        r = await c.put(f"/v1/tasks/{'y' * 5000}", files={"artifact": ("a", b"x")})
        assert r.status_code == 400 and len(r.content) < 1000
        text = (await c.get("/metrics")).text
    assert "ghost" not in text and "x" * 100 not in text and "y" * 100 not in text
    assert 'route="/v1/generate",status="404",task="unknown"} 40.0' in text
    assert 'route="/v1/generate",status="200",task="real"} 1.0' in text


# -- 5: connection cap, request-head deadline, log rate limit ----------------------------------------------------
async def test_slow_header_connections_cannot_starve_the_server(app_for):
    with live_server(app_for(max_connections=8, header_timeout_s=1.0)) as url:
        port = _port(url)
        slow = []
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: t\r\nX-Slow: ")  # never finishes its headers
            slow.append(s)
        waits = await asyncio.to_thread(_close_times, slow, 10)
        assert max(waits) < 5, "every slow connection is closed: at once past the cap, after 1 s within it"
        assert sum(w < 0.9 for w in waits) >= 30, "connections past the cap are closed as they arrive"
        async with httpx.AsyncClient(base_url=url, timeout=10, headers=USER) as c:
            r = await c.post("/v1/generate", json={"task": "base", "input_ids": [5], "max_new_tokens": 1})
            assert r.status_code == 200


def _close_times(sockets: list[socket.socket], limit_s: float) -> list[float]:
    """Seconds until the server closed each socket (limit_s for one still open then), watched in one thread."""
    sel = selectors.DefaultSelector()
    for i, s in enumerate(sockets):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
    start, times = time.monotonic(), [limit_s] * len(sockets)
    while sel.get_map() and time.monotonic() - start < limit_s:
        for key, _ in sel.select(timeout=0.05):
            try:
                data = key.fileobj.recv(1024)
            except OSError:
                data = b""
            if not data:
                times[key.data] = time.monotonic() - start
                sel.unregister(key.fileobj)
    sel.close()
    return times


def test_repeated_log_lines_are_rate_limited():
    limit = LogRateLimit(burst=10, window_s=0.2)
    record = logging.LogRecord("asyncio", logging.ERROR, "x", 1, "socket.accept() out of system resource", (), None)
    passed = sum(limit.filter(record) for _ in range(10_000))
    assert passed == 10
    other = logging.LogRecord("asyncio", logging.ERROR, "x", 1, "a different message", (), None)
    assert limit.filter(other)
    time.sleep(0.25)
    assert limit.filter(record) and "9990 similar messages suppressed" in record.getMessage()


# -- 6: bounded stop lists, valid stop tokens --------------------------------------------------------------------
async def test_stop_lists_are_bounded_and_stop_tokens_checked(app_for):
    async with asgi_client(app_for(), timeout=30, headers=USER) as c:
        body = {"task": "base", "input_ids": [5], "max_new_tokens": 1}
        r = await c.post("/v1/generate", json={**body, "stop": ["w5"] * 17})
        assert r.status_code == 422 and "at most 16 items" in r.json()["error"]["message"]
        r = await c.post("/v1/generate", json={**body, "stop": ["x" * 257]})
        assert r.status_code == 422
        r = await c.post("/v1/completions", json={"model": "base", "prompt": [5], "stop": ["w"] * 17})
        assert r.status_code == 400  # OpenAI's status for an invalid request
        for bad in ([-1], [2**70], [128]):
            r = await c.post("/v1/generate", json={**body, "stop_token_ids": bad})
            msg = r.json()["error"]["message"]
            assert r.status_code == 422 and "stop_token_ids: expected token ids in [0, 128)" in msg, msg
        assert (await c.post("/v1/generate", json={**body, "stop": ["w5"] * 16})).status_code == 200


# -- 7: multi-prompt completions admitted all or none ------------------------------------------------------------
async def test_completions_over_the_queue_bound_leave_no_work_behind(app_for):
    async with asgi_client(app_for(max_queue=16), timeout=30, headers=ROOT) as c:
        r = await c.post("/v1/completions", json={"model": "base", "prompt": [[5]] * 40, "max_tokens": 200})
        assert r.status_code == 429 and "this call adds 40" in r.json()["error"]["message"]
        text = (await c.get("/metrics")).text
        assert "prefixserve_running_requests 0.0" in text and "prefixserve_queue_depth 0.0" in text
        r = await c.post("/v1/completions", json={"model": "base", "prompt": [[5]] * 8, "max_tokens": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 8


# -- 8: nested JSON, dot names, /ready details -------------------------------------------------------------------
async def test_nested_json_dot_names_and_ready_details(app_for):
    async with asgi_client(app_for()) as c:  # the admin key per request; none on the anonymous ones
        deep = b"[" * 100_000 + b"]" * 100_000
        files = {"adapter_config": ("c.json", deep), "adapter_model": ("m.safetensors", b"x" * 16)}
        r = await c.put("/v1/tasks/nested", files=files, headers=ROOT)
        assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
        blob = json.dumps({"a": 1}).encode()
        for name in ("...", "....."):
            r = await c.put(f"/v1/tasks/{name}", files={"artifact": ("a", blob)}, headers=ROOT)
            assert r.status_code == 400 and "not only dots" in r.json()["error"]["message"]
        details = (await c.get("/ready", headers=ROOT)).json()
        assert details["backbone"]["name"] == "tiny-llama"
        r = await c.get("/ready")
        assert r.status_code == 200 and r.json()["backbone"] is None
        assert all(v is True for v in r.json()["checks"].values())
        assert (await c.get("/ready", headers=USER)).json()["backbone"] is None


# -- 9: torch threads per replica --------------------------------------------------------------------------------
def test_torch_threads_setting_is_applied(monkeypatch):
    monkeypatch.setenv("PREFIXSERVE_TORCH_THREADS", "1")
    monkeypatch.setenv("PREFIXSERVE_API_KEYS", "k")
    monkeypatch.setattr(service_main, "run", lambda *a, **kw: 0)
    monkeypatch.setattr(service_main, "create_app", lambda settings: None)
    before = torch.get_num_threads()
    try:
        assert service_main.main(["--port", "0"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
