"""The console over HTTP: its assets (types, security headers, nothing fetched from elsewhere), its admin JSON
endpoint, and the task list's search and paging that it pages thousands of tasks with."""

import asyncio
import re
import uuid

import pytest

from prefix_store import BackboneFingerprint, encode
from service.app import create_app
from service.routes.ui import ASSETS, STATIC
from service.runtime import wrap_model
from service.settings import ServiceSettings
from tests.factories import make_artifact
from tests.models import tiny_model
from tests.service.live import asgi_client

pytestmark = pytest.mark.redis
ADMIN = {"Authorization": "Bearer root"}
USER = {"Authorization": "Bearer user"}
# Anything a browser would fetch from another origin: a scheme URL or a protocol-relative one. The SVG namespace is a
# name that createElementNS takes, never fetched.
EXTERNAL = re.compile(r"(?:[a-z][a-z0-9+.-]*:)?//[a-z0-9-]+(?:\.[a-z0-9-]+)+", re.I)
SVG_NS = "http://www.w3.org/2000/svg"


@pytest.fixture
def bert():
    return tiny_model("bert-cls")


def _app(redis_url, bert, namespace=None, **settings):
    s = ServiceSettings(
        redis_url=redis_url,
        namespace=namespace or f"ui-{uuid.uuid4().hex[:8]}",
        api_keys=["user"],
        admin_keys=["root"],
        **settings,
    )
    return create_app(s, backbone=wrap_model(bert.bert, None, name="tiny-bert"))


def test_every_asset_is_local():
    for name in ASSETS:
        text = (STATIC / name).read_text()
        found = [m for m in EXTERNAL.findall(text) if not SVG_NS.startswith(m)]
        assert found == [], f"{name} refers to other origins: {found}"
    assert "<script>" not in (STATIC / "index.html").read_text()  # the CSP allows no inline script
    assert sorted(p.name for p in STATIC.iterdir()) == sorted(ASSETS), "a file in static/ that is never served"


async def test_page_and_assets_need_no_key_and_carry_security_headers(redis_url, bert):
    async with asgi_client(_app(redis_url, bert)) as c:
        for path, kind in [
            ("/ui", "text/html"),
            ("/ui/", "text/html"),
            ("/ui/static/app.js", "text/javascript"),
            ("/ui/static/api.js", "text/javascript"),
            ("/ui/static/plot.js", "text/javascript"),
            ("/ui/static/app.css", "text/css"),
        ]:
            r = await c.get(path)
            assert r.status_code == 200, (path, r.text)
            assert r.headers["content-type"].startswith(kind), (path, r.headers["content-type"])
            csp = r.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
            assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-cache"
        r = await c.get("/ui/static/..%2F..%2Fsettings.py")  # only the table's names are ever read
        assert r.status_code == 404
        assert (await c.get("/ui/elsewhere")).status_code == 401  # only the page and its assets are open
        r = await c.get("/ui/static/secrets.txt")
        assert r.status_code == 404 and "no console asset 'secrets.txt'" in r.json()["error"]["message"]


async def test_load_endpoint_needs_the_admin_key(redis_url, bert):
    async with asgi_client(_app(redis_url, bert)) as c:
        r = await c.get("/ui/api/load")
        assert r.status_code == 401 and "missing bearer key" in r.json()["error"]["message"]
        r = await c.get("/ui/api/load", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["message"] == "invalid bearer key"
        r = await c.get("/ui/api/load", headers=USER)
        assert r.status_code == 403 and "admin routes need an admin key" in r.json()["error"]["message"]

        native = make_artifact("t", fp=BackboneFingerprint.from_config(bert.config), P=3, labels=["neg", "pos"])
        r = await c.put("/v1/tasks/t", files={"artifact": ("a.safetensors", encode(native))}, headers=ADMIN)
        assert r.status_code == 201, r.text
        for _ in range(3):
            r = await c.post("/v1/classify", json={"task": "t", "input_ids": [5, 6, 7]}, headers=USER)
            assert r.status_code == 200, r.text
        r = await c.get("/ui/api/load", headers=ADMIN)
        assert r.status_code == 200, r.text
        load = r.json()
        # Inference requests only: the upload and these reads of /ui/api/load are not counted.
        assert load["requests"] == 3 and load["errors"] == 0 and load["queue"] == 0 and load["running"] == 0
        assert load["tasks"]["t"]["requests"] == 3 and load["tasks"]["t"]["resident"] == 1
        assert load["batch_steps"] >= 1 and load["batch_rows"] >= 3 and load["tasks_total"] == 1
        assert load["cache"]["device"]["hits"] + load["cache"]["device"]["misses"] >= 3
        # The scheduler's gauges are found by a scrape restricted to them, as /ui/api/load reads them.
        r = await c.get("/metrics", params={"name[]": "prefixserve_queue_depth"}, headers=ADMIN)
        assert "prefixserve_queue_depth 0.0" in r.text


async def test_task_search_and_paging(redis_url, bert):
    fp = BackboneFingerprint.from_config(bert.config)
    blob = encode(make_artifact("x", fp=fp, P=2))
    names = [f"alpha-{i:02d}" for i in range(12)] + [f"beta-{i:02d}" for i in range(5)]
    async with asgi_client(_app(redis_url, bert)) as c:
        for name in names:
            r = await c.put(f"/v1/tasks/{name}", files={"artifact": ("a.safetensors", blob)}, headers=ADMIN)
            assert r.status_code == 201, r.text
        r = await c.get("/v1/tasks", headers=ADMIN)  # the old default: every task, sorted, no page
        assert [t["task"] for t in r.json()["tasks"]] == names and r.headers["x-total-count"] == "17"
        assert set(r.json()) == {"tasks"}

        r = await c.get("/v1/tasks", params={"q": "alpha", "offset": 5, "limit": 4}, headers=ADMIN)
        assert [t["task"] for t in r.json()["tasks"]] == names[5:9] and r.headers["x-total-count"] == "12"
        r = await c.get("/v1/tasks", params={"q": "beta", "offset": 3, "limit": 200}, headers=ADMIN)
        assert [t["task"] for t in r.json()["tasks"]] == ["beta-03", "beta-04"]
        r = await c.get("/v1/tasks", params={"q": "beta", "offset": 50, "limit": 10}, headers=ADMIN)
        assert r.json() == {"tasks": []} and r.headers["x-total-count"] == "5"
        r = await c.get("/v1/tasks", params={"q": "gamma"}, headers=ADMIN)
        assert r.json() == {"tasks": []} and r.headers["x-total-count"] == "0"

        for params, said in [
            ({"limit": 201}, "query.limit: Input should be less than or equal to 200"),
            ({"limit": 0}, "query.limit: Input should be greater than or equal to 1"),
            ({"offset": -1}, "query.offset: Input should be greater than or equal to 0"),
            ({"q": "x" * 129}, "query.q: String should have at most 128 characters"),
        ]:
            r = await c.get("/v1/tasks", params=params, headers=ADMIN)
            assert r.status_code == 422 and said in r.json()["error"]["message"], (params, r.text)
        assert (await c.get("/v1/tasks", params={"limit": 5}, headers=USER)).status_code == 403


async def test_residency_per_replica_from_every_replicas_announcements(redis_url, bert):
    """Two replicas on one store: the task runs on one of them only, and either replica's /ui/api/replicas says so;
    a replica that stops is gone from the list."""
    ns = f"ui-{uuid.uuid4().hex[:8]}"
    blob = encode(make_artifact("t", fp=BackboneFingerprint.from_config(bert.config), P=3, labels=["neg", "pos"]))
    a, b = (_app(redis_url, bert, namespace=ns, replica_announce_s=0.2) for _ in range(2))

    async def listed(c, want: int, **params) -> list[dict]:
        for _ in range(100):
            r = await c.get("/ui/api/replicas", params=params, headers=ADMIN)
            assert r.status_code == 200, r.text
            views = r.json()["replicas"]
            if len(views) == want and all(v["resident_tasks"] == (v["replica"] == ids[0]) for v in views):
                return views
            await asyncio.sleep(0.1)
        raise AssertionError(views)

    async with asgi_client(a) as ca:
        async with asgi_client(b) as cb:
            r = await ca.put("/v1/tasks/t", files={"artifact": ("a.safetensors", blob)}, headers=ADMIN)
            assert r.status_code == 201, r.text
            r = await ca.post("/v1/classify", json={"task": "t", "input_ids": [5, 6, 7]}, headers=USER)
            assert r.status_code == 200, r.text
            ids = [a.state.replica, b.state.replica]
            views = {v["replica"]: v for v in await listed(cb, 2, task="t")}
            assert views[ids[0]]["resident"] == [1] and views[ids[1]]["resident"] == []
            assert views[ids[0]]["backbone"] == "tiny-bert" and views[ids[0]]["pinned"] is None
            assert (await cb.get("/ui/api/replicas", headers=USER)).status_code == 403
            r = await cb.get("/ui/api/replicas", params={"task": "x" * 129}, headers=ADMIN)
            assert r.status_code == 422 and "query.task" in r.text
        views = (await ca.get("/ui/api/replicas", headers=ADMIN)).json()["replicas"]
        assert [v["replica"] for v in views] == [ids[0]], "the stopped replica withdrew its view"
        assert "resident" not in views[0], "without a task: counts only"
