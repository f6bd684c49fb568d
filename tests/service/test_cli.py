"""The `prefixserve` admin CLI as an operator runs it (a subprocess) against a running service and a trainer worker:
tasks list/show/upload/rollback/delete/export, train submit/status/watch, tables and --json, the server's error
printed as it is, and exit codes scripts can rely on."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
from peft import PrefixTuningConfig

from prefix_store import decode
from tests.engine_harness import trained_peft
from tests.models import tiny_model
from tests.service.live import live_server
from tests.trainer.test_worker import DATA, ROOT, model_dir, service_app, start_worker  # noqa: F401 (fixture)

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
        assert cli(url, "tasks", "list").returncode == 3  # the server is gone
    finally:
        worker.terminate()
        worker.wait(30)
