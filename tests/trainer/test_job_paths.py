"""Training jobs read and write only inside the allowed folders, and never send a file's content back.

Over real HTTP (uvicorn as `python -m service` runs it), a real Redis and a real `python -m trainer worker`: the
service refuses a path outside PREFIXSERVE_TRAIN_DATA_DIRS / PREFIXSERVE_EXPORT_DIRS at submission (403, nothing
queued, nothing read); a worker with narrower settings than the service checks again before it reads; a file inside
the folders that is not training data fails its job with an error that quotes none of it; its lines never become a
served task's labels."""

import asyncio
import json
import time
import uuid

import httpx
import pytest
import redis

from prefix_store.keys import KeyLayout
from service.app import create_app
from service.runtime import load_backbone
from service.settings import ServiceSettings
from tests.service.live import live_server
from tests.trainer.test_worker import DATA, model_dir, start_worker, stop  # noqa: F401 (fixture)

pytestmark = [pytest.mark.redis, pytest.mark.slow]

SECRET = "PREFIXSERVE_ADMIN_KEYS=s3cr3t-admin-key-4711"
PASSWD = [
    "root:x:0:0:root:/root:/bin/bash",
    "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin",
    "bin:x:2:2:bin:/bin:/usr/sbin/nologin",
]
CLASSIFY = [{"text": f"w{3 + i % 9} w{5 + i % 4}", "label": "yes" if i % 2 else "no"} for i in range(24)]


def app_with(model_dir, redis_url, ns, **settings):  # noqa: F811
    backbone = load_backbone(str(model_dir), local_files_only=True)
    return create_app(ServiceSettings(redis_url=redis_url, namespace=ns, **settings), backbone=backbone)


def queued(redis_url, ns) -> int:
    return redis.Redis.from_url(redis_url).xlen(KeyLayout(ns).jobs)


async def ended(c, job_id, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        job = (await c.get(f"/v1/train/{job_id}")).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.2)


@pytest.fixture
def files(tmp_path):
    allowed, exports, outside = tmp_path / "allowed", tmp_path / "exports", tmp_path / "outside"
    for d in (allowed, exports, outside):
        d.mkdir()
    (outside / "secret.env").write_text(SECRET + "\n")
    (allowed / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CLASSIFY))
    (allowed / "link.jsonl").symlink_to(outside / "secret.env")  # inside by name, outside once resolved
    (allowed / "env.csv").write_text(SECRET + "\nPREFIXSERVE_API_KEYS=another-one\n")  # a .env read as a CSV
    rows = "".join(f"w{3 + i} w{4 + i},{line}\n" for i, line in enumerate(PASSWD))
    (allowed / "passwd.csv").write_text("t,l\n" + rows)  # every line of /etc/passwd a label
    (allowed / "strings.jsonl").write_text(json.dumps(PASSWD[0]) + "\n")  # JSON, but not an object
    return {"root": tmp_path, "allowed": allowed, "exports": exports, "outside": outside}


async def test_submission_refuses_paths_outside_the_allowed_folders(model_dir, redis_url, files):  # noqa: F811
    ns = f"paths-{uuid.uuid4().hex[:8]}"
    allowed, outside = files["allowed"], files["outside"]
    app = app_with(model_dir, redis_url, ns, train_data_dirs=[str(allowed)], export_dirs=[str(files["exports"])])
    job = {"task": "paths", "method": "p_tuning_v2", "steps": 2}
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            refused = {
                "a system file": ({"data": "/etc/passwd"}, 403, "PREFIXSERVE_TRAIN_DATA_DIRS"),
                "a secret beside the folder": ({"data": str(outside / "secret.env")}, 403, "outside"),
                "a .. out of the folder": ({"data": f"{allowed}/../outside/secret.env"}, 403, "outside"),
                "a symbolic link out": ({"data": str(allowed / "link.jsonl")}, 403, "outside"),
                "dev data outside": (
                    {"data": str(allowed / "train.jsonl"), "dev_data": "/etc/hostname"},
                    403,
                    "dev_data",
                ),
                "a relative path": ({"data": "allowed/train.jsonl"}, 400, "absolute"),
                "a NUL byte": ({"data": f"{allowed}/train\x00.jsonl"}, 400, "not a usable path"),
                "an export outside": (
                    {"examples": DATA, "export_peft": str(outside / "peft")},
                    403,
                    "PREFIXSERVE_EXPORT_DIRS",
                ),
                "labels shaped like a password entry": (
                    {"examples": CLASSIFY, "labels": ["no", "root:x:0:0"]},
                    422,
                    "labels[1]",
                ),
                "too many labels": ({"examples": CLASSIFY, "labels": [f"l{i}" for i in range(1025)]}, 422, "labels"),
            }
            for what, (fields, status, words) in refused.items():
                r = await c.post("/v1/train", json={**job, **fields})
                message = r.json()["error"]["message"]
                assert r.status_code == status and words in message, (what, r.status_code, message)
                assert "s3cr3t" not in message and "root:x" not in message.replace("'root:x:0:0'", ""), what
            assert queued(redis_url, ns) == 0, "nothing refused was queued"

            inside = {"data": str(allowed / "train.jsonl"), "export_peft": str(files["exports"] / "paths")}
            r = await c.post("/v1/train", json={**job, **inside})
            assert r.status_code == 202, r.text
            assert queued(redis_url, ns) == 1
            assert r.json()["spec"]["data"] == str(allowed / "train.jsonl"), "queued as given"

    app = app_with(model_dir, redis_url, ns)  # the defaults: no folder at all
    with live_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            r = await c.post("/v1/train", json={**job, "data": str(allowed / "train.jsonl")})
            assert r.status_code == 403 and "paths are off" in r.json()["error"]["message"], r.text
            r = await c.post("/v1/train", json={**job, "examples": DATA, "export_peft": str(files["exports"])})
            assert r.status_code == 403 and "PREFIXSERVE_EXPORT_DIRS" in r.json()["error"]["message"], r.text
            assert (await c.post("/v1/train", json={**job, "examples": DATA})).status_code == 202
    assert queued(redis_url, ns) == 2


async def test_the_worker_checks_again_and_never_quotes_a_file(model_dir, redis_url, files, tmp_path):  # noqa: F811
    """The service allows the whole test folder; the worker only `allowed/` and no export folder. Every job fails
    with an error that names what was wrong and holds none of the file's content, and nothing is published."""
    ns = f"worker-paths-{uuid.uuid4().hex[:8]}"
    allowed = files["allowed"]
    app = app_with(model_dir, redis_url, ns, train_data_dirs=[str(files["root"])], export_dirs=[str(files["root"])])
    env = {"PREFIXSERVE_TRAIN_DATA_DIRS": str(allowed), "PREFIXSERVE_EXPORT_DIRS": ""}
    worker = start_worker(model_dir, redis_url, ns, tmp_path / "work", "w1", tmp_path / "w1.log", env_extra=env)
    cls = {"method": "p_tuning_v2", "steps": 4, "eval_every": 2, "publish_degenerate": True}
    jobs = {
        # (spec, words the error must hold)
        "outside": ({"data": str(files["outside"] / "secret.env")}, ["outside", "PREFIXSERVE_TRAIN_DATA_DIRS"]),
        "envfile": ({"data": str(allowed / "env.csv")}, ["columns match no known layout"]),
        "passwd": (
            {"data": str(allowed / "passwd.csv"), "columns": {"text": "t", "label": "l"}},
            ["the data's labels[0]", "outside letters, digits"],
        ),
        "strings": ({"data": str(allowed / "strings.jsonl")}, ["expected a JSON object, found a str"]),
        "export": (
            {"data": str(allowed / "train.jsonl"), "export_peft": str(files["exports"] / "x")},
            ["export_peft", "PREFIXSERVE_EXPORT_DIRS"],
        ),
    }
    try:
        with live_server(app) as url:
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                ids = {}
                for task, (fields, _) in jobs.items():
                    r = await c.post("/v1/train", json={"task": task, **cls, **fields})
                    assert r.status_code == 202, (task, r.text)
                    ids[task] = r.json()["job_id"]
                for task, (_, words) in jobs.items():
                    job = await ended(c, ids[task])
                    assert job["state"] == "failed", (task, job)
                    for word in words:
                        assert word in job["error"], (task, job["error"])
                    for content in (SECRET, "s3cr3t", "another-one", "root:x", "daemon:x", "bin:x", "nologin"):
                        assert content not in job["error"], (task, job["error"])
                    assert (await c.get(f"/v1/tasks/{task}")).status_code == 404, f"{task} was published"
                r = await c.post("/v1/classify", json={"task": "passwd", "texts": ["w3 w4"]})
                assert r.status_code == 404
                assert not (files["exports"] / "x").exists()
    finally:
        stop(worker)
