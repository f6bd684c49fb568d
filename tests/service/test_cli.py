"""The `prefixserve` admin CLI as an operator runs it (a subprocess) against a running service and a trainer worker:
tasks list/show/upload/rollback/delete/export, train submit/status/watch, tables and --json, the server's error
printed as it is, and exit codes scripts can rely on; global options anywhere on the line, the key from the server's
variable, usage errors in one line; a watch that says when no worker consumes the queue, and ends with the version
its job published."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from peft import PrefixTuningConfig

from prefix_store import connect, decode
from prefix_store.jobs import JobQueue
from service.cli import NO_WORKER, admin_key, parser
from tests.engine_harness import trained_peft
from tests.models import tiny_model
from tests.service.live import live_server
from tests.trainer.test_worker import DATA, ROOT, model_dir, service_app, start_worker, stop  # noqa: F401 (fixture)

pytestmark = [pytest.mark.redis, pytest.mark.slow]
ADMIN = "admin-key"


def cli(url: str, *args: str, key: str | None = ADMIN) -> subprocess.CompletedProcess:
    env_key = ["--key", key] if key else []
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "--url", url, *env_key, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_cli_against_a_running_service(model_dir, redis_url, tmp_path):  # noqa: F811
    ns = f"cli-{uuid.uuid4().hex[:8]}"
    pm = trained_peft(tiny_model("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), seed=1)
    pm.save_pretrained(tmp_path / "adapter")
    app = service_app(model_dir, redis_url, ns)
    app.state.settings.admin_keys = [ADMIN]
    worker = start_worker(model_dir, redis_url, ns, tmp_path / "work", "w1", tmp_path / "w1.log")
    try:
        with live_server(app) as url:
            r = cli(url, "tasks", "list")
            assert r.returncode == 0 and r.stdout.split()[:3] == ["TASK", "VERSION", "VERSIONS"], r
            for version in (1, 2):
                r = cli(url, "tasks", "upload", "alpha", str(tmp_path / "adapter"))
                assert r.returncode == 0 and r.stdout.strip() == f"alpha version {version} is current (p_tuning_v2)"
            listed = json.loads(cli(url, "--json", "tasks", "list").stdout)
            assert [(t["task"], t["current_version"]) for t in listed["tasks"]] == [("alpha", 2)]
            assert "current version 2" in cli(url, "tasks", "show", "alpha").stdout
            template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
            (tmp_path / "chat.jinja").write_text(template)
            r = cli(
                url,
                "tasks",
                "upload",
                "gamma",
                str(tmp_path / "adapter"),
                "--chat-template",
                str(tmp_path / "chat.jinja"),
            )
            assert r.returncode == 0, r
            assert (
                json.loads(cli(url, "tasks", "show", "gamma", "--json").stdout)["current"]["chat_template"] == template
            )
            assert cli(url, "tasks", "delete", "gamma").returncode == 0
            assert cli(url, "tasks", "rollback", "alpha", "1").returncode == 0
            assert json.loads(cli(url, "--json", "tasks", "show", "alpha").stdout)["current_version"] == 1
            r = cli(url, "tasks", "export", "alpha", str(tmp_path / "a.safetensors"))
            assert r.returncode == 0 and decode((tmp_path / "a.safetensors").read_bytes()).version == 1
            r = cli(url, "tasks", "delete", "alpha", "--version", "1")  # the current one: the server says no
            assert r.returncode == 1 and r.stderr.startswith("409: ") and "current" in r.stderr, r
            assert cli(url, "tasks", "delete", "alpha", "--version", "2").returncode == 0
            r = cli(url, "tasks", "show", "nope")
            assert r.returncode == 1 and r.stderr.strip() == "404: task 'nope' not found", r
            assert cli(url, "tasks", "list", key=None).stderr.startswith("401: ")
            assert cli(url, "tasks", "upload", "x", str(tmp_path / "missing")).returncode == 2
            spec = {"task": "beta", "method": "p_tuning_v2", "examples": DATA, "steps": 8, "eval_every": 4}
            (tmp_path / "job.json").write_text(json.dumps(spec))
            job = json.loads(cli(url, "--json", "train", "submit", str(tmp_path / "job.json")).stdout)
            assert job["state"] == "queued"
            r = cli(url, "train", "watch", job["job_id"], "--interval", "0.2", "--timeout", "150")
            assert r.returncode == 0 and f"job {job['job_id']}: succeeded" in r.stdout, r
            assert "[##############################] 8/8" in r.stderr
            assert json.loads(cli(url, "--json", "train", "status", job["job_id"]).stdout)["state"] == "succeeded"
            listed = cli(url, "train", "list", "--limit", "5").stdout.splitlines()
            assert job["job_id"] in listed[1] and "succeeded" in listed[1] and "beta" in listed[1], listed
            assert cli(url, "train", "list", "--limit", "101").returncode == 1, "the server's bound, its message"
        assert cli(url, "tasks", "list").returncode == 3  # the server is gone
    finally:
        worker.terminate()
        worker.wait(30)


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI as installed (`.venv/bin/prefixserve` runs service.cli:main), with `env` instead of the key variables
    of the test's own environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFIXSERVE_")}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**base, **(env or {})},
    )


def test_global_options_go_anywhere():
    p = parser()
    for argv in (
        ["--json", "--url", "http://h:1", "--key", "k", "tasks", "list"],
        ["tasks", "list", "--json", "--url", "http://h:1", "--key", "k"],
        ["tasks", "--json", "list", "--key", "k", "--url", "http://h:1"],
        ["--url", "http://h:1", "train", "watch", "j", "--json", "--key", "k"],
    ):
        a = p.parse_args(argv)
        assert (a.json, a.url, a.key) == (True, "http://h:1", "k"), argv
    assert p.parse_args(["tasks", "list"]).json is False
    nobody = "http://127.0.0.1:9"  # nothing listens: a command that parsed exits 3, not 2
    r = run("tasks", "list", "--json", "--url", nobody)
    assert r.returncode == 3 and r.stderr.startswith(f"cannot reach {nobody}"), r


def test_usage_errors_exit_2_with_one_line(tmp_path):
    nobody = "http://127.0.0.1:9"
    (tmp_path / "not-peft").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    cases = {
        "unrecognized arguments: --bogus": ["tasks", "list", "--bogus"],
        "invalid choice": ["tasks", "frobnicate"],
        "cannot read the job file": ["train", "submit", str(tmp_path / "missing.json")],
        "no such directory": ["tasks", "export", "t", str(tmp_path / "no" / "t.safetensors")],
        "is a directory": ["tasks", "export", "t", str(tmp_path)],
        "a PEFT directory holds": ["tasks", "upload", "t", str(tmp_path / "not-peft")],
        "no such file or directory": ["tasks", "upload", "t", str(tmp_path / "dangling")],
        "cannot read --chat-template": ["tasks", "upload", "t", str(tmp_path), "--chat-template", str(tmp_path / "x")],
        "--url: expected http": ["tasks", "list", "--url", "ftp://h"],
    }
    for words, argv in cases.items():
        r = run("--url", nobody, *argv) if "--url" not in argv else run(*argv)
        lines = r.stderr.splitlines()
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0], (argv, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr and r.stdout == ""


def test_the_key_comes_from_the_servers_variable(capsys):
    assert admin_key({"PREFIXSERVE_ADMIN_KEYS": " first , second", "PREFIXSERVE_ADMIN_KEY": "old"}) == "first"
    assert capsys.readouterr().err == ""
    assert admin_key({"PREFIXSERVE_ADMIN_KEY": "old"}) == "old"
    assert "PREFIXSERVE_ADMIN_KEY is deprecated: set PREFIXSERVE_ADMIN_KEYS" in capsys.readouterr().err
    assert admin_key({}) is None


def test_watch_says_no_worker_is_consuming_then_names_the_published_version(model_dir, redis_url, tmp_path):  # noqa: F811
    ns = f"cli-{uuid.uuid4().hex[:8]}"
    app = service_app(model_dir, redis_url, ns)
    app.state.settings.admin_keys = [ADMIN]
    spec = {"task": "beta", "method": "p_tuning_v2", "examples": DATA, "steps": 8, "eval_every": 4}
    (tmp_path / "job.json").write_text(json.dumps(spec))
    worker = None
    try:
        with live_server(app) as url:
            env = {"PREFIXSERVE_URL": url, "PREFIXSERVE_ADMIN_KEYS": f"{ADMIN},another"}
            r = run("tasks", "list", env={"PREFIXSERVE_URL": url, "PREFIXSERVE_ADMIN_KEY": ADMIN})
            assert r.returncode == 0 and "PREFIXSERVE_ADMIN_KEY is deprecated" in r.stderr, r
            job = json.loads(run("train", "submit", str(tmp_path / "job.json"), "--json", env=env).stdout)
            assert job["state"] == "queued" and job["workers_alive"] == 0, job
            r = run("train", "watch", job["job_id"], "--interval", "0.5", "--timeout", "8", env=env)
            assert r.returncode == 4 and NO_WORKER in r.stderr and r.stderr.count(NO_WORKER) == 1, r
            assert "make worker" in NO_WORKER and "python -m trainer worker" in NO_WORKER
            worker = start_worker(model_dir, redis_url, ns, tmp_path / "work", "w1", tmp_path / "w1.log")
            deadline = time.monotonic() + 120  # the worker loads its backbone, then says it is alive
            while not asyncio.run(_workers_alive(redis_url, ns)):
                assert time.monotonic() < deadline and worker.poll() is None, (tmp_path / "w1.log").read_text()
                time.sleep(0.2)
            r = run("train", "watch", job["job_id"], "--interval", "0.3", "--timeout", "150", env=env)
            assert r.returncode == 0 and NO_WORKER not in r.stderr, r
            done = json.loads(run("train", "status", job["job_id"], "--json", env=env).stdout)
            result = done["result"]
            want = f"published beta version {result['version']}" if result["published"] else "not published"
            assert r.stdout.strip().splitlines()[-1].startswith(want), (r.stdout, result)
            assert asyncio.run(_workers_alive(redis_url, ns)) == 1
        stop(worker)
        worker = None
        assert asyncio.run(_workers_alive(redis_url, ns)) == 0, "a worker that stopped is no longer counted"
    finally:
        if worker is not None:
            stop(worker)


async def _workers_alive(redis_url: str, ns: str) -> int:
    client = connect(redis_url)
    try:
        return await JobQueue(client, namespace=ns).workers_alive()
    finally:
        await client.aclose()


def test_the_progress_bar_follows_steps_or_the_share_of_a_time_budget():
    from service.cli import progress_bar

    assert progress_bar({"step": 3, "steps": 10, "loss": 0.5}).startswith("[#########-----")
    timed = progress_bar({"step": 3, "steps": None, "done": 0.5, "loss": 0.5})
    assert timed.startswith("[" + "#" * 15 + "-" * 15 + "]") and "3 steps, 50% of its time" in timed
    assert progress_bar(None) == "[" + "-" * 30 + "] 0/?"
