"""docker-compose.yml is valid and wired as documented. No Docker engine runs here, so images are not built."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = shutil.which("docker-compose")

needs_compose = pytest.mark.skipif(
    COMPOSE is None and not os.environ.get("CI"), reason="docker-compose not installed (make test installs it)"
)


def _config(env: dict[str, str]) -> subprocess.CompletedProcess:
    assert COMPOSE, "docker-compose is required in CI: `make test` installs Debian's package"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFIXSERVE_")}
    return subprocess.run(
        [COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "config"],
        cwd=ROOT,
        env=base | env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@needs_compose
def test_compose_file_is_valid_and_wired():
    r = _config({"PREFIXSERVE_API_KEYS": "k1", "PREFIXSERVE_ADMIN_KEYS": "a1"})
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    redis, service, trainer = (cfg["services"][n] for n in ("redis", "service", "trainer"))
    assert redis["image"].startswith("redis:7")
    assert "--appendonly" in redis["command"] and redis["healthcheck"]["test"][-1] == "ping"
    assert any(
        str(v).startswith("redis-data") or (isinstance(v, dict) and v.get("source") == "redis-data")
        for v in redis["volumes"]
    )
    assert "redis-data" in cfg["volumes"]
    for svc in (service, trainer):
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert svc["environment"]["PREFIXSERVE_REDIS_URL"] == "redis://redis:6379/0"
    assert "/health" in " ".join(service["healthcheck"]["test"])
    assert service["environment"]["PREFIXSERVE_API_KEYS"] == "k1"
    assert service["environment"]["PREFIXSERVE_ADMIN_KEYS"] == "a1"
    assert service["build"]["dockerfile"] == "docker/service.Dockerfile"
    assert trainer["build"]["dockerfile"] == "docker/trainer.Dockerfile"
    assert "trainer-work" in cfg["volumes"] and trainer["environment"]["PREFIXSERVE_WORK_DIR"] == "/work/checkpoints"
    assert service["environment"]["PREFIXSERVE_TORCH_THREADS"] == "2"
    assert trainer["environment"]["PREFIXSERVE_TORCH_THREADS"] == "2"


@needs_compose
def test_compose_refuses_to_start_without_keys():
    r = _config({})
    assert r.returncode != 0 and "PREFIXSERVE_API_KEYS" in r.stderr


def test_dockerfiles_take_a_base_image_and_keep_its_torch():
    for name in ("service", "trainer"):
        text = (ROOT / "docker" / f"{name}.Dockerfile").read_text()
        assert "ARG BASE_IMAGE=python:3.11-slim" in text and 'python -c "import torch"' in text


def test_images_install_the_runtime_lock():
    for name in ("service", "trainer"):
        text = (ROOT / "docker" / f"{name}.Dockerfile").read_text()
        assert "--require-hashes -r requirements/requirements-runtime.txt" in text
        assert "pip install --no-deps --no-build-isolation ." in text and "pip check" in text
