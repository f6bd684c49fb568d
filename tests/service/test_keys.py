"""Keys as data (POST/GET/DELETE /v1/keys), task scopes, per-key limits and the metrics scope, over real HTTP and a
real Redis: one app through the ASGI transport for the contract, two replicas (two apps on one namespace, each a
uvicorn server) for what must hold across them (a key made on A works on B at once, a revocation on A reaches B
within a second, one rate limit for both), and a Redis of its own stopped mid-test for the outage."""

import asyncio
import copy
import time

import httpx
import pytest

from prefix_store import BackboneFingerprint, EmbeddedRedis
from service.app import create_app
from service.runtime import wrap_model
from service.settings import ServiceSettings
from tests.factories import make_artifact
from tests.models import tiny_model, tiny_tokenizer
from tests.service.live import asgi_client, live_server

pytestmark = pytest.mark.redis

ROOT = {"Authorization": "Bearer root"}
USER = {"Authorization": "Bearer user"}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture
def make_app(redis_url, store, llama):
    """An app on the test's namespace, with an environment admin key `root` and inference key `user`."""

    def make(url=None, tokenizer=None, **settings):
        settings = {"api_keys": ["user"], "admin_keys": ["root"], **settings}
        s = ServiceSettings(redis_url=url or redis_url, namespace=store.ns, **settings)
        tok = tokenizer or tiny_tokenizer()
        return create_app(s, backbone=wrap_model(copy.deepcopy(llama), tok, name="tiny-llama"))

    return make


@pytest.fixture
async def tasks(store, llama):
    fp = BackboneFingerprint.from_config(llama.config)
    for name in ("sent-a", "sent-b", "other"):
        await store.put(make_artifact(name, fp=fp, P=2))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def new_key(c, **body) -> str:
    r = await c.post("/v1/keys", json=body, headers=ROOT)
    assert r.status_code == 201, r.text
    return r.json()["key"]


GEN = {"task": "base", "input_ids": [5, 6], "max_new_tokens": 2}


async def test_create_list_inspect_revoke_and_bad_bodies(make_app):
    async with asgi_client(make_app()) as c:
        body = {"name": "team-a", "tasks": ["sent-*"], "requests_per_minute": 60, "priority": "high"}
        r = await c.post("/v1/keys", json=body, headers=ROOT)
        assert r.status_code == 201, r.text
        made = r.json()
        secret = made.pop("key")
        assert secret.startswith("ps-") and len(secret) > 40
        assert made == {
            "name": "team-a",
            "scope": "inference",
            "tasks": ["sent-*"],
            "requests_per_minute": 60,
            "tokens_per_minute": None,
            "priority": "high",
            "created_at": made["created_at"],
        }
        r = await c.post("/v1/keys", json={"name": "team-a"}, headers=ROOT)
        assert r.status_code == 409 and "key 'team-a' exists" in r.json()["error"]["message"]
        await new_key(c, name="gateway", scope="metrics")

        listed = await c.get("/v1/keys", headers=ROOT)
        one = await c.get("/v1/keys/team-a", headers=ROOT)
        assert [k["name"] for k in listed.json()["keys"]] == ["gateway", "team-a"] and listed.json()["next"] is None
        assert one.json() == made
        page = (await c.get("/v1/keys", params={"limit": 1}, headers=ROOT)).json()
        assert [k["name"] for k in page["keys"]] == ["gateway"] and page["next"] == "gateway"
        page = (await c.get("/v1/keys", params={"after": "gateway"}, headers=ROOT)).json()
        assert [k["name"] for k in page["keys"]] == ["team-a"]
        for text in (listed.text, one.text, page):
            assert secret not in str(text) and "digest" not in str(text)

        for bad, status, words in [
            ({"name": "x", "key": "mine"}, 422, "key: Extra inputs are not permitted"),
            ({"name": "no spaces"}, 422, "invalid key name 'no spaces': expected 1 to 64 characters"),
            ({"name": "x", "scope": "root"}, 422, "scope: Input should be 'inference', 'admin' or 'metrics'"),
            ({"name": "x", "tasks": ["Sent*"]}, 422, "tasks[0] 'Sent*': expected a glob"),
            ({"name": "x", "scope": "admin", "tasks": ["a"]}, 422, "an admin key sees every task"),
            ({"name": "x", "requests_per_minute": 0}, 422, "requests_per_minute: Input should be greater than"),
            ({"name": "x", "priority": "urgent"}, 422, "priority: Input should be 'high', 'normal' or 'low'"),
            ({"tasks": ["*"]}, 422, "name: Field required"),
        ]:
            r = await c.post("/v1/keys", json=bad, headers=ROOT)
            assert r.status_code == status and words in r.json()["error"]["message"], (bad, r.text)
        r = await c.get("/v1/keys/bad name", headers=ROOT)
        assert r.status_code == 400 and "invalid key name" in r.json()["error"]["message"]
        r = await c.get("/v1/keys", params={"limit": 0}, headers=ROOT)
        assert r.status_code == 422 and "limit" in r.json()["error"]["message"]

        # Who may manage keys: admin keys only (a stored inference key, an environment one, none at all).
        for headers, status in [({}, 401), (USER, 403), (bearer(secret), 403), (bearer("ps-forged"), 401)]:
            assert (await c.get("/v1/keys", headers=headers)).status_code == status
        admin = await new_key(c, name="ops", scope="admin")
        assert (await c.get("/v1/keys/ops", headers=bearer(admin))).status_code == 200

        assert (await c.post("/v1/generate", json=GEN, headers=bearer(secret))).status_code == 200
        assert (await c.delete("/v1/keys/team-a", headers=ROOT)).status_code == 204
        r = await c.post("/v1/generate", json=GEN, headers=bearer(secret))  # revoked on this replica at once
        assert r.status_code == 401 and r.json()["error"]["message"] == "invalid bearer key"
        r = await c.delete("/v1/keys/team-a", headers=ROOT)
        assert r.status_code == 404 and r.json()["error"]["message"] == "key 'team-a' not found"


async def test_a_key_sees_only_its_tasks_on_every_route(make_app, tasks):
    async with asgi_client(make_app()) as c:
        scoped = bearer(await new_key(c, name="sentiment", tasks=["sent-*"]))
        metrics = bearer(await new_key(c, name="gateway", scope="metrics"))
        inference = bearer(await new_key(c, name="all-tasks"))

        def calls(task):
            return [
                ("/v1/generate", {"task": task, "input_ids": [5, 6], "max_new_tokens": 2}),
                ("/v1/classify", {"task": task, "input_ids": [5, 6]}),
                ("/v1/completions", {"model": task, "prompt": [5, 6], "max_tokens": 2}),
                ("/v1/chat/completions", {"model": task, "messages": [{"role": "user", "content": "w5"}]}),
                ("/v1/embeddings", {"model": task, "input": "w5"}),
                ("/tokenize", {"model": task, "prompt": "w5 w6"}),
                ("/detokenize", {"model": task, "tokens": [5, 6]}),
            ]

        for (path, hidden), (_, unknown) in zip(calls("other"), calls("missing")):
            a = await c.post(path, json=hidden, headers=scoped)
            b = await c.post(path, json=unknown, headers=scoped)
            # A task the key does not see answers as a task that does not exist: same status, same message shape.
            assert a.status_code == b.status_code == 404, (path, a.text, b.text)
            ea, eb = a.json()["error"], b.json()["error"]
            assert ea["message"] == "task 'other' not found" and eb["message"] == "task 'missing' not found"
            assert ea["type"] == eb["type"] and set(ea) == set(eb)
            pin = {k: "other@1" for k in ("task", "model") if k in hidden}  # a version pin hides nothing more
            pinned = await c.post(path, json={**hidden, **pin}, headers=scoped)
            assert pinned.status_code == 404 and pinned.json()["error"]["message"] == "task 'other' not found", path
        for path, body in calls("sent-a"):  # its own tasks answer whatever the route answers them (never 404)
            r = await c.post(path, json=body, headers=scoped)
            assert r.status_code != 404, (path, r.text)
        r = await c.post("/v1/generate", json={**GEN, "task": "sent-b"}, headers=scoped)
        assert r.status_code == 200 and r.json()["version"] == 1, r.text
        assert (await c.post("/v1/generate", json=GEN, headers=scoped)).status_code == 200  # base: every key's

        models = await c.get("/v1/models", headers=scoped)
        assert [m["id"] for m in models.json()["data"]] == ["base", "sent-a", "sent-b"]
        for headers in (inference, USER, ROOT):
            models = await c.get("/v1/models", headers=headers)
            assert [m["id"] for m in models.json()["data"]] == ["base", "other", "sent-a", "sent-b"]

        # Scopes: metrics reads /metrics only; inference keys never read /metrics or admin routes.
        assert (await c.get("/metrics", headers=metrics)).status_code == 200
        for method, path in [
            ("POST", "/v1/generate"),
            ("GET", "/v1/models"),
            ("GET", "/v1/tasks"),
            ("GET", "/v1/keys"),
        ]:
            r = await c.request(method, path, json=GEN if method == "POST" else None, headers=metrics)
            assert r.status_code == 403 and "may read /metrics only" in r.json()["error"]["message"], path
        for headers in (scoped, USER):
            r = await c.get("/metrics", headers=headers)
            assert r.status_code == 403 and "/metrics needs a metrics or admin key" in r.json()["error"]["message"]
            assert (await c.get("/v1/tasks", headers=headers)).status_code == 403
        assert (await c.get("/metrics", headers=ROOT)).status_code == 200


async def test_two_replicas_share_keys_revocations_and_limits(make_app):
    app_a, app_b = make_app(), make_app()
    with live_server(app_a) as url_a, live_server(app_b) as url_b:
        await _until(lambda: app_a.state.keys.subscribed.is_set() and app_b.state.keys.subscribed.is_set())
        async with (
            httpx.AsyncClient(base_url=url_a, timeout=30) as a,
            httpx.AsyncClient(base_url=url_b, timeout=30) as b,
        ):
            limited = bearer(await new_key(a, name="limited", requests_per_minute=3))
            # Made on A, valid on B at once; one limit across both: 2 requests on A and 1 on B, then 429 on either.
            for c in (b, a, a):
                r = await c.post("/v1/generate", json=GEN, headers=limited)
                assert r.status_code == 200, r.text
            for c in (a, b):
                r = await c.post("/v1/generate", json=GEN, headers=limited)
                assert r.status_code == 429, r.text
                assert 1 <= int(r.headers["retry-after"]) <= 120
                msg = r.json()["error"]["message"]
                assert "key 'limited' may use 3 requests per minute (requests_per_minute)" in msg, msg
                assert f"retry after {r.headers['retry-after']} s" in msg
            # Counted on submission only: routes that submit nothing are free.
            assert (await b.get("/v1/models", headers=limited)).status_code == 200

            doomed = bearer(await new_key(a, name="doomed"))
            assert (await b.get("/v1/models", headers=doomed)).status_code == 200  # now cached on B
            assert (await a.delete("/v1/keys/doomed", headers=ROOT)).status_code == 204
            start = time.monotonic()
            while (await b.get("/v1/models", headers=doomed)).status_code != 401:
                assert time.monotonic() - start < 1.0, "B still accepts a key revoked on A after 1 s"
                await asyncio.sleep(0.02)


async def test_tokens_are_charged_up_front_and_refused_requests_refunded(make_app):
    app = make_app(max_queue=1, max_batch_size=1)
    async with asgi_client(app) as c:
        tokens = bearer(await new_key(c, name="tokens", tokens_per_minute=30))
        # 2 prompt tokens + 12 new tokens = 14, twice; then 2 + 4 = 6 would make 34 > 30.
        body = {"model": "base", "prompt": [5, 6], "max_tokens": 12}
        for _ in range(2):
            assert (await c.post("/v1/completions", json=body, headers=tokens)).status_code == 200
        r = await c.post("/v1/completions", json={**body, "max_tokens": 4}, headers=tokens)
        msg = r.json()["error"]["message"]
        assert r.status_code == 429 and "may use 30 tokens per minute (tokens_per_minute)" in msg, msg
        assert "this request charges 6" in msg and int(r.headers["retry-after"]) >= 1
        # 2 + 20 new tokens x n 2 = 42: more than the key may ever use in a minute.
        r = await c.post("/v1/completions", json={**body, "max_tokens": 20, "n": 2}, headers=tokens)
        msg = r.json()["error"]["message"]
        assert r.status_code == 400 and "charges 42 tokens" in msg and "tokens_per_minute 30" in msg, msg

        # One row, a queue of one: a third request is refused by the queue (429 queue full) and not charged.
        rpm = bearer(await new_key(c, name="rpm", requests_per_minute=3))
        sched = app.state.services.scheduler
        long = {**GEN, "max_new_tokens": 80, "ignore_eos": True}
        first = asyncio.create_task(c.post("/v1/generate", json=long, headers=rpm))
        await _until(lambda: sched.running == 1)
        second = asyncio.create_task(c.post("/v1/generate", json=long, headers=rpm))
        await _until(lambda: sched.queue_depth == 1)
        full = await c.post("/v1/generate", json=GEN, headers=rpm)
        assert full.status_code == 429 and "queue full" in full.json()["error"]["message"], full.text
        assert [(await t).status_code for t in (first, second)] == [200, 200]
        assert (await c.post("/v1/generate", json=GEN, headers=rpm)).status_code == 200  # the refunded third
        r = await c.post("/v1/generate", json=GEN, headers=rpm)
        assert r.status_code == 429 and "requests_per_minute" in r.json()["error"]["message"]


async def test_open_server_ignores_stored_keys(make_app, tasks):
    """No environment keys: auth is off, so every request is admin and sees every task; keys can still be made
    (for replicas with auth on), and a stored key changes nothing here."""
    async with asgi_client(make_app(api_keys=[], admin_keys=[])) as c:
        r = await c.post("/v1/keys", json={"name": "later", "tasks": ["sent-*"], "requests_per_minute": 1})
        assert r.status_code == 201
        for _ in range(2):
            models = await c.get("/v1/models", headers=bearer(r.json()["key"]))
            assert [m["id"] for m in models.json()["data"]] == ["base", "other", "sent-a", "sent-b"]
            gen = await c.post("/v1/generate", json={**GEN, "task": "other"}, headers=bearer(r.json()["key"]))
            assert gen.status_code == 200


async def test_redis_down_is_503_for_stored_keys_and_nothing_for_environment_keys(make_app, tmp_path):
    redis = EmbeddedRedis(tmp_path / "r")
    url = redis.start()
    try:
        async with asgi_client(make_app(url=url)) as c:
            key = bearer(await new_key(c, name="k"))
            redis.stop()
            r = await c.post("/v1/generate", json=GEN, headers=key)  # never checked before: Redis must say
            assert r.status_code == 503 and "cannot check the bearer key" in r.json()["error"]["message"], r.text
            assert (await c.post("/v1/generate", json=GEN, headers=USER)).status_code == 200
            r = await c.post("/v1/generate", json=GEN, headers=bearer("not-a-stored-key"))
            assert r.status_code == 401  # not the shape of a stored key: no Redis needed to refuse it
    finally:
        redis.stop()


async def _until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_a_key_past_its_limits_is_refused_before_any_work(make_app):
    """Right after its key is resolved, before its body is read: a key over its requests per minute, or at its tokens
    per minute, gets its 429 without tokenising, rendering or looking up anything (a malformed body is not even
    parsed). /tokenize with chat messages renders a template, so it counts as a request; with a prompt it is free."""
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    app = make_app(tokenizer=tok)
    async with asgi_client(app) as c:
        services = app.state.services
        renders = 0
        render = services.templates.render

        async def counted(*args, **kw):
            nonlocal renders
            renders += 1
            return await render(*args, **kw)

        services.templates.render = counted
        chat = {"model": "base", "messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 2}

        rpm = bearer(await new_key(c, name="rpm", requests_per_minute=2))
        assert (
            await c.post("/tokenize", json={"model": "base", "messages": chat["messages"]}, headers=rpm)
        ).status_code == 200
        assert (await c.post("/v1/chat/completions", json=chat, headers=rpm)).status_code == 200
        assert renders == 2
        for path, body in [("/v1/chat/completions", chat), ("/v1/generate", {"task": "base"})]:
            r = await c.post(path, json=body, headers=rpm)  # the malformed one too: 429, not 422
            msg = r.json()["error"]["message"]
            assert r.status_code == 429 and "may use 2 requests per minute (requests_per_minute)" in msg, msg
            assert 1 <= int(r.headers["retry-after"]) <= 120
        r = await c.post("/tokenize", json={"model": "base", "messages": chat["messages"]}, headers=rpm)
        assert r.status_code == 429 and "requests_per_minute" in r.json()["error"]["message"]
        assert renders == 2, "nothing rendered for a key past its limit"
        for path, body in [
            ("/tokenize", {"model": "base", "prompt": "w5 w6"}),
            ("/detokenize", {"model": "base", "tokens": [5]}),
        ]:
            assert (await c.post(path, json=body, headers=rpm)).status_code == 200, path  # not counted

        tpm = bearer(await new_key(c, name="tpm", tokens_per_minute=30))
        body = {"model": "base", "prompt": [5, 6], "max_tokens": 13}  # 2 + 13 = 15 tokens, twice: all 30 used
        for _ in range(2):
            assert (await c.post("/v1/completions", json=body, headers=tpm)).status_code == 200
        r = await c.post("/v1/completions", json={"model": "base", "prompt": "w5", "max_tokens": "x"}, headers=tpm)
        msg = r.json()["error"]["message"]
        assert r.status_code == 429 and "may use 30 tokens per minute (tokens_per_minute) (all used)" in msg, msg


async def test_a_made_up_key_is_remembered_until_a_key_is_made(make_app, monkeypatch):
    """A client repeating a made-up `ps-` key costs one Redis lookup, not one a request. A key made on replica A
    is announced, so replica B, which has just refused that very secret as unknown, takes it at once."""
    import prefix_store.tenants as tenants

    app_a, app_b = make_app(), make_app()
    async with asgi_client(app_a) as a, asgi_client(app_b) as b:
        await _until(lambda: app_a.state.keys.subscribed.is_set() and app_b.state.keys.subscribed.is_set())
        ring = app_b.state.keys
        ring.unknown_ttl_s = 60.0  # remembered far longer than the test: only the creation event can clear it
        lookups = 0
        lookup = ring.store.lookup

        async def counted(secret):
            nonlocal lookups
            lookups += 1
            return await lookup(secret)

        ring.store.lookup = counted
        made_up = bearer("ps-" + "x" * 43)
        for _ in range(5):
            r = await b.get("/v1/models", headers=made_up)
            assert r.status_code == 401 and r.json()["error"]["message"] == "invalid bearer key"
        assert lookups == 1

        monkeypatch.setattr(tenants.secrets, "token_urlsafe", lambda n: "x" * 43)  # A makes exactly that secret
        assert await new_key(a, name="late") == "ps-" + "x" * 43
        start = time.monotonic()
        while (await b.get("/v1/models", headers=made_up)).status_code != 200:
            assert time.monotonic() - start < 1.0, "B still refuses a key made on A after 1 s"
            await asyncio.sleep(0.01)
        assert lookups == 2


async def test_a_displaced_request_gets_a_clean_429_and_its_charge_back(make_app):
    """One row, a queue of one: a low key's second request waits (streaming), then a high key's request takes its
    place. The low request is answered 429 queue full with Retry-After, as if refused at arrival, and its charge is
    refunded: the low key still has two of its three requests a minute."""
    app = make_app(max_queue=1, max_batch_size=1)
    async with asgi_client(app) as c:
        low = bearer(await new_key(c, name="batch", priority="low", requests_per_minute=3))
        high = bearer(await new_key(c, name="live", priority="high"))
        sched = app.state.services.scheduler
        long = {**GEN, "max_new_tokens": 80, "ignore_eos": True}
        first = asyncio.create_task(c.post("/v1/generate", json=long, headers=low))
        await _until(lambda: sched.running == 1)
        queued = asyncio.create_task(c.post("/v1/generate", json={**GEN, "stream": True}, headers=low))
        await _until(lambda: sched.queue_depth == 1)
        r = await c.post("/v1/generate", json=GEN, headers=high)
        assert r.status_code == 200, r.text
        displaced = await queued
        msg = displaced.json()["error"]["message"]
        assert displaced.status_code == 429 and displaced.headers["retry-after"] == "1", displaced.text
        assert "queue full: a high-priority request took the place of this low-priority one" in msg, msg
        assert (await first).status_code == 200
        for _ in range(2):  # the refunded second, and a third
            assert (await c.post("/v1/generate", json=GEN, headers=low)).status_code == 200
        r = await c.post("/v1/generate", json=GEN, headers=low)
        assert r.status_code == 429 and "requests_per_minute" in r.json()["error"]["message"]
        assert sched.queue_depth == 0 and sched.running == 0
