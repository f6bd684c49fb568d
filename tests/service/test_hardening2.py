"""Issue 24 (hardening II): no client can stall or exhaust a replica through the newer surfaces, and no file is read
outside its folder. One test per finding, over real HTTP (uvicorn as `python -m service` runs it) and a real
Redis; each failed before its fix."""

from __future__ import annotations

import asyncio
import copy
import time

import httpx
import pytest

from service.app import create_app
from service.routes.health import _engine_check
from service.runtime import wrap_model
from service.settings import ServiceSettings
from tests.models import tiny_model, tiny_tokenizer
from tests.service.live import live_server

pytestmark = pytest.mark.redis
USER, ROOT = {"Authorization": "Bearer user"}, {"Authorization": "Bearer root"}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture
def app_for(redis_url, store, llama):
    def make(tokenizer=None, model=None, **settings):
        settings = {"api_keys": ["user"], "admin_keys": ["root"], **settings}
        s = ServiceSettings(redis_url=redis_url, namespace=store.ns, **settings)
        return create_app(s, backbone=wrap_model(copy.deepcopy(model or llama), tokenizer, name="tiny-llama"))

    return make


def _until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# -- 8: a failed device step takes the replica out of readiness; every 500 is JSON with the request id ------------
def test_a_device_fault_fails_readiness_and_stops_the_server(app_for):
    app = app_for()
    with live_server(app) as url:
        engine = app.state.services.engine

        def poisoned(plan):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        engine.step = poisoned
        body = {"task": "base", "input_ids": [5, 6, 7], "max_new_tokens": 2}
        r = httpx.post(f"{url}/v1/generate", json=body, headers={**USER, "X-Request-ID": "fault-1"}, timeout=30)
        assert r.status_code == 500 and r.headers["x-request-id"] == "fault-1"
        err = r.json()["error"]
        assert err["request_id"] == "fault-1" and "CUDA error" in err["message"]
        # What /ready answers, read from its own check: the server is stopping already, and over HTTP the question
        # races its listener closing.
        check = _engine_check(app.state.services)
        assert isinstance(check, str) and "device fault" in check, check
        assert app.state.fatal and "CUDA error" in app.state.fatal
        # The server was told to stop, so a supervisor restarts the process (python -m service exits with 3).
        _until(lambda: not _alive(url))


def _alive(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=1)
        return True
    except httpx.HTTPError:
        return False


def test_a_failed_step_is_unready_until_a_step_succeeds_and_threshold_failures_give_up(app_for):
    app = app_for(max_step_failures=2)
    with live_server(app) as url:
        engine = app.state.services.engine
        real = engine.step
        engine.step = lambda plan: (_ for _ in ()).throw(ValueError("a bug for this input"))
        body = {"task": "base", "input_ids": [5, 6, 7], "max_new_tokens": 2}
        assert httpx.post(f"{url}/v1/generate", json=body, headers=USER, timeout=30).status_code == 500
        ready = httpx.get(f"{url}/ready", headers=ROOT, timeout=10)
        assert ready.status_code == 503 and "a bug for this input" in ready.json()["checks"]["engine"]
        engine.step = real
        assert httpx.post(f"{url}/v1/generate", json=body, headers=USER, timeout=30).status_code == 200
        assert httpx.get(f"{url}/ready", timeout=10).status_code == 200, "a good step makes it ready again"
        assert app.state.fatal is None
        engine.step = lambda plan: (_ for _ in ()).throw(ValueError("again"))
        for _ in range(2):
            assert httpx.post(f"{url}/v1/generate", json=body, headers=USER, timeout=30).status_code == 500
        assert app.state.fatal and "2 engine steps failed in a row" in app.state.fatal


def test_an_unhandled_error_is_a_json_500_with_the_request_id(app_for, monkeypatch):
    app = app_for(tokenizer=tiny_tokenizer())
    with live_server(app) as url:
        services = app.state.services
        monkeypatch.setattr(services.backbone, "tokenizer", None)  # a route then fails where nothing expects it

        def broken(*a, **kw):
            raise KeyError("nothing handles this")

        monkeypatch.setattr(services.scheduler, "submit_all", broken)
        r = httpx.post(
            f"{url}/v1/generate",
            json={"task": "base", "input_ids": [5], "max_new_tokens": 1},
            headers={**USER, "X-Request-ID": "boom-7"},
            timeout=30,
        )
        assert r.status_code == 500 and r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]["request_id"] == "boom-7" and r.headers["x-request-id"] == "boom-7"
        assert "nothing handles this" not in r.text, "internals stay in the log"


# -- 9: fair share inside a task ---------------------------------------------------------------------------------
async def test_one_clients_big_request_does_not_hold_another_client_of_the_same_task(app_for):
    """Client A asks for 64 rows (16 prompts x n 4) on the bare backbone with 2 rows free; client B's one small
    request, sent just after, is admitted in A's stead at the next free row and finishes while A is still running
    (FIFO within the task kept B behind all 64)."""
    app = app_for(api_keys=["user", "user2"], max_batch_size=2)
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            big = {"model": "base", "prompt": [[5 + i, 6, 7] for i in range(16)], "n": 4, "max_tokens": 8}
            a = asyncio.create_task(c.post("/v1/completions", json=big, headers=USER))
            await asyncio.sleep(0.3)
            assert not a.done()
            small = {"model": "base", "prompt": [9, 9], "max_tokens": 2}
            b = await c.post("/v1/completions", json=small, headers={"Authorization": "Bearer user2"})
            assert b.status_code == 200
            assert not a.done(), "B finished while A's 64 rows were still running"
            assert (await a).status_code == 200


# -- 4: chat templates run under a budget, in a process that can be stopped; failures say whose they are ------------
async def _upload(c, tmp_path, llama, task: str, template: str, headers=ROOT):
    from peft import PrefixTuningConfig

    from tests.engine_harness import trained_peft

    pm = trained_peft(llama, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), seed=1)
    pm.save_pretrained(tmp_path / task)
    files = {
        "adapter_config": ("c", (tmp_path / task / "adapter_config.json").read_bytes()),
        "adapter_model": ("m", (tmp_path / task / "adapter_model.safetensors").read_bytes()),
    }
    return await c.put(f"/v1/tasks/{task}", data={"chat_template": template}, files=files, headers=headers)


PLAIN = "{% for m in messages %}w4 {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w6{% endif %}"
# Harmless on the upload check's two messages, a CPU bomb from the third message on.
BOMB_LATER = (
    "{% if messages|length > 2 %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{% endif %}" + PLAIN
)
# Not constant (Jinja folds constants when it compiles a template: `'x' * 10**9` alone fails the upload check).
MEMORY_LATER = "{% if messages|length > 2 %}{{ 'x' * (messages|length * 10**9) }}{% endif %}" + PLAIN
POWER_LATER = "{% if messages|length > 2 %}{{ 7 ** (messages|length * 10**8) }}{% endif %}" + PLAIN
REFUSES = (
    "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message comes first') }}{% endif %}" + PLAIN
)
BROKEN_LATER = "{% if messages|length > 2 %}{{ messages[0]['content'].upper(1, 2, 3) }}{% endif %}" + PLAIN
THREE = [
    {"role": "user", "content": "w10"},
    {"role": "assistant", "content": "w11"},
    {"role": "user", "content": "w12"},
]


async def test_a_template_that_loops_is_refused_at_upload_within_its_budget(app_for, llama, tmp_path):
    with live_server(app_for(tokenizer=tiny_tokenizer(), template_budget_s=2.0)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            bomb = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}" + PLAIN
            start = time.monotonic()
            r = await _upload(c, tmp_path, llama, "bomb", bomb)
            assert r.status_code == 400 and "within its budget" in r.json()["error"]["message"], r.text
            assert time.monotonic() - start < 30
            assert (await c.get("/v1/tasks/bomb", headers=ROOT)).status_code == 404, "nothing was stored"
            r = await _upload(c, tmp_path, llama, "bomb", "{{ 'x' * 10**9 }}" + PLAIN)  # folded when compiled
            assert r.status_code == 400 and "memory budget" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize(
    "template, status, words",
    [
        (BOMB_LATER, 500, ["task 'later'", "budget"]),
        (MEMORY_LATER, 500, ["task 'later'", "budget"]),
        (POWER_LATER, 500, ["task 'later'", "budget"]),
        (BROKEN_LATER, 500, ["task 'later'", "TypeError"]),
    ],
    ids=["cpu", "memory", "power", "broken"],
)
async def test_a_template_failing_at_run_time_is_a_500_naming_the_task_and_stalls_nobody(
    app_for, llama, tmp_path, template, status, words
):
    app = app_for(tokenizer=tiny_tokenizer(), template_budget_s=2.0)
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            assert (await _upload(c, tmp_path, llama, "later", template)).status_code == 201
            chat = asyncio.create_task(
                c.post("/v1/chat/completions", json={"model": "later", "messages": THREE}, headers=USER)
            )
            await asyncio.sleep(0.3)
            t0 = time.monotonic()  # meanwhile: the loop answers, plain generation runs
            assert (await c.get("/health")).status_code == 200 and time.monotonic() - t0 < 0.5
            gen = {"task": "base", "input_ids": [5, 6], "max_new_tokens": 2}
            assert (await c.post("/v1/generate", json=gen, headers=USER)).status_code == 200
            r = await chat
            assert r.status_code == status, r.text
            assert all(w in r.json()["error"]["message"] for w in words), r.text
            assert (await _upload(c, tmp_path, llama, "fine", PLAIN)).status_code == 201
            ok = await c.post("/v1/chat/completions", json={"model": "fine", "messages": THREE}, headers=USER)
            assert ok.status_code == 200, "a renderer serves the next chat"
            if app.state.services.templates.killed:  # it overran or crashed its renderer: refused a while, unrendered
                t0 = time.monotonic()
                again = await c.post(
                    "/v1/chat/completions", json={"model": "later", "messages": THREE[:1]}, headers=USER
                )
                assert again.status_code == 500 and "refused for" in again.text and time.monotonic() - t0 < 1


async def test_a_template_refusing_the_messages_is_the_callers_400(app_for, llama, tmp_path):
    with live_server(app_for(tokenizer=tiny_tokenizer())) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            r = await _upload(c, tmp_path, llama, "strict", REFUSES)
            assert r.status_code == 400 and "a system message comes first" in r.text, "the canonical check refuses it"
            ok = REFUSES.replace("!= 'system'", "== 'tool'")
            assert (await _upload(c, tmp_path, llama, "strict", ok)).status_code == 201
            r = await c.post(
                "/v1/chat/completions",
                json={"model": "strict", "messages": [{"role": "tool", "content": "w1"}]},
                headers=USER,
            )
            assert r.status_code in (400, 422)


# -- 9: /tokenize never shows an inference key a task's own chat template --------------------------------------------
async def test_tokenize_shows_a_tasks_own_template_to_admin_keys_only(app_for, llama, tmp_path):
    with live_server(app_for(tokenizer=tiny_tokenizer())) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            secret = "w99 w98 w97 " + PLAIN  # a system prompt in the template
            assert (await _upload(c, tmp_path, llama, "bot", secret)).status_code == 201
            body = {"model": "bot", "messages": [{"role": "user", "content": "w10"}]}
            user = (await c.post("/tokenize", json=body, headers=USER)).json()
            admin = (await c.post("/tokenize", json=body, headers=ROOT)).json()
            assert admin["tokens"][:3] == [99, 98, 97] and admin["count"] == len(admin["tokens"])
            assert user["tokens"] is None and user["token_strs"] is None and user["count"] == admin["count"]


# -- 5: adapters by reference: regular files inside the folder, reads bounded, no shared executor -------------------
def test_a_fifo_or_a_link_out_inside_an_allowed_folder_is_refused_and_hangs_nothing(app_for, llama, tmp_path):
    import os

    from peft import PrefixTuningConfig

    from tests.engine_harness import trained_peft

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    os.mkfifo(allowed / "fifo")
    peft_dir = allowed / "peft"
    trained_peft(llama, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), seed=3).save_pretrained(
        peft_dir
    )
    (tmp_path / "shadow").write_text("root:$6$secret-hash:19000:0:99999:7:::\n")
    linked = allowed / "linked"
    linked.mkdir()
    (linked / "adapter_config.json").symlink_to(tmp_path / "shadow")  # a file link out, inside an allowed folder
    (linked / "adapter_model.safetensors").symlink_to(peft_dir / "adapter_model.safetensors")
    fifo_dir = allowed / "fifo_dir"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "adapter_config.json")
    (fifo_dir / "adapter_model.safetensors").write_bytes(b"x")
    app = app_for(adapter_dirs=str(allowed))
    with live_server(app) as url:
        with httpx.Client(base_url=url, timeout=30, headers=ROOT) as c:
            for _ in range(8):  # more than any shared executor's share: each is refused at once
                r = c.put("/v1/tasks/f", json={"source": str(allowed / "fifo")})
                assert r.status_code == 400 and "not a regular file" in r.text, r.text
            r = c.put("/v1/tasks/f", json={"source": str(fifo_dir)})
            assert r.status_code == 400 and "not a regular file" in r.text
            r = c.put("/v1/tasks/l", json={"source": str(linked)})
            assert r.status_code == 403 and "links outside" in r.text and "secret-hash" not in r.text
            garbage = allowed / "garbage.safetensors"
            garbage.write_bytes(b"\xff\xfe\x00\x01secret-bytes-here")
            r = c.put("/v1/tasks/g", json={"source": str(garbage)})
            assert r.status_code == 400 and "secret" not in r.text and "0xff" not in r.text.lower(), r.text
            # uploads and prefix loads still work: nothing is stuck
            r = c.put("/v1/tasks/ok", json={"source": str(peft_dir)})
            assert r.status_code == 201, r.text
            gen = c.post("/v1/generate", json={"task": "ok", "input_ids": [5, 6], "max_new_tokens": 2}, headers=USER)
            assert gen.status_code == 200


# -- 6: echo + logprobs + n: computed once per prompt, bounded, serialised off the event loop -----------------------
async def test_echo_fan_out_is_bounded_and_built_off_the_event_loop(app_for):
    app = app_for(tokenizer=tiny_tokenizer(), max_logprob_entries=300_000)
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            prompts = [[(7 * i + j) % 120 + 3 for j in range(120)] for i in range(32)]
            huge = {"model": "base", "prompt": prompts, "n": 8, "echo": True, "logprobs": 20, "max_tokens": 4}
            t0 = time.monotonic()
            r = await c.post("/v1/completions", json=huge, headers=USER)
            assert r.status_code == 400 and "300000" in r.text and time.monotonic() - t0 < 2, r.text
            # Just under the limit (8 x 4 x (120 + 4) x 21 = 83,328 entries): answered, and the loop stays free while
            # the response is built.
            big = {**huge, "prompt": prompts[:8], "n": 4}
            slowest = 0.0

            async def probe() -> None:
                nonlocal slowest
                while True:
                    t = time.monotonic()
                    await c.get("/health")
                    slowest = max(slowest, time.monotonic() - t)
                    await asyncio.sleep(0.02)

            prober = asyncio.create_task(probe())
            r = await c.post("/v1/completions", json=big, headers=USER)
            prober.cancel()
            assert r.status_code == 200, r.text
            choices = r.json()["choices"]
            assert len(choices) == 32 and slowest < 0.5, slowest
            for p in range(8):  # a prompt's echoed log-probabilities are the same in each of its choices
                echoes = [ch["logprobs"]["token_logprobs"][:120] for ch in choices[4 * p : 4 * p + 4]]
                assert echoes[0][0] is None and all(e == echoes[0] for e in echoes)


# -- 1 and 2: structured output bounded in memory and time, refused with a 400, in its own pool ---------------------
@pytest.fixture(scope="module")
def byte_llama():
    return tiny_model("llama-bytes")


def _rss_mb(pid: int | None = None) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


async def test_pathological_schemas_are_bounded_and_a_broken_matcher_is_a_400(app_for, byte_llama):
    from tests.models import byte_tokenizer

    app = app_for(tokenizer=byte_tokenizer(), model=byte_llama)
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:

            def fmt(schema):
                return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}

            body = {"model": "base", "prompt": [5, 6], "max_tokens": 4}
            plain = await c.post(
                "/v1/completions", json={**body, "response_format": fmt({"type": "object"})}, headers=USER
            )
            assert plain.status_code == 200
            before = _rss_mb()
            for i in range(10):  # each distinct, ~16 MiB of lexer when compiled: the cache keeps 64 MiB of them
                schema = {"type": "string", "pattern": f"^(a{{1000}}){{{1000 + i}}}$"}
                r = await c.post("/v1/completions", json={**body, "response_format": fmt(schema)}, headers=USER)
                assert r.status_code in (200, 400), r.text
            grew = _rss_mb() - before
            assert grew < 150, f"RSS grew {grew:.0f} MiB for 10 pathological schemas"
            assert app.state.services.engine.grammars.cached_bytes <= 32 * 2**20
            loop = {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}
            r = await c.post("/v1/completions", json={**body, "response_format": fmt(loop)}, headers=USER)
            assert r.status_code == 400 and "cannot be matched" in r.text, "not a 200 with an empty text"
            wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(10_000)}}
            wide["required"] = list(wide["properties"])
            gen = {"task": "base", "input_ids": [5, 6], "max_new_tokens": 4}
            slow = [
                c.post("/v1/completions", json={**body, "response_format": fmt(wide)}, headers=USER) for _ in range(16)
            ]
            t0 = time.monotonic()
            others = [c.post("/v1/generate", json=gen, headers=USER) for _ in range(4)]
            done = await asyncio.gather(*slow, *others)
            assert all(r.status_code == 200 for r in done[16:])
            assert {r.status_code for r in done[:16]} <= {400, 429}, {r.status_code for r in done[:16]}
            assert all(r.status_code == 400 and "nodes" in r.text for r in done[:16]), "refused at once, not queued"
            assert time.monotonic() - t0 < 10


def _png(width: int, height: int) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, "PNG")  # 1-bit zeros: a few kB however many pixels
    return base64.b64encode(buf.getvalue()).decode()


async def test_image_floods_are_refused_from_their_headers_and_stall_nobody(redis_url, store):
    from tests.service.runtime.test_vpt import tiny_vit

    s = ServiceSettings(redis_url=redis_url, namespace=store.ns, api_keys=["user"], admin_keys=["root"])
    app = create_app(s, backbone=wrap_model(tiny_vit(), None, name="tiny-vit"))
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            strip = await c.post("/v1/embeddings", json={"model": "base", "input": [_png(1, 16_777_216)]}, headers=USER)
            assert strip.status_code == 422 or strip.status_code == 400
            assert "4096 pixels a side" in strip.text, strip.text
            big = _png(4096, 4096)
            flood = [
                c.post("/v1/embeddings", json={"model": "base", "input": [big] * 16}, headers=USER) for _ in range(2)
            ]
            small = {"model": "base", "input": [_png(16, 16)]}
            t0 = time.monotonic()
            done = await asyncio.gather(*flood, c.post("/v1/embeddings", json=small, headers=USER))
            assert all(r.status_code in (400, 429) for r in done[:2]), [r.text for r in done[:2]]
            assert any("pixels in all" in r.text for r in done[:2])
            assert done[2].status_code == 200 and time.monotonic() - t0 < 10
