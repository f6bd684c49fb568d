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


@pytest.mark.slow  # runs docker-compose: a subprocess, installed by `make test`, not `make test-fast`
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


@pytest.mark.slow  # runs docker-compose: a subprocess, installed by `make test`, not `make test-fast`
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


K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.31.0"


def _k8s_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_k8s_manifests_validate_against_the_schemas():
    import kubernetes_validate

    docs = _k8s_documents()
    kinds = sorted(d["kind"] for _, d in docs)
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Deployment",
        "Namespace",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Service",
        "Service",
        "StatefulSet",
    ]
    for _, doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises with the field at fault
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted({n for n, _ in docs}), "every manifest is in the kustomization"


def test_k8s_service_is_wired_as_documented():
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in _k8s_documents()}
    api = docs[("Deployment", "prefix-serve")]["spec"]["template"]["spec"]["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == api["startupProbe"]["httpGet"]["path"] == "/health"
    env = {e["name"]: e for e in api["env"]}
    assert env["PREFIXSERVE_TORCH_THREADS"]["value"] == api["resources"]["requests"]["cpu"], "a thread per core"
    assert env["PREFIXSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "prefix-serve-keys"
    pdb = docs[("PodDisruptionBudget", "prefix-serve")]["spec"]
    assert pdb["selector"]["matchLabels"] == docs[("Deployment", "prefix-serve")]["spec"]["selector"]["matchLabels"]
    redis = docs[("StatefulSet", "redis")]["spec"]["template"]["spec"]["containers"][0]
    assert "--appendonly" in redis["args"]
    config = docs[("ConfigMap", "prefix-serve-config")]["data"]
    assert config["PREFIXSERVE_REDIS_URL"] == "redis://redis:6379/0"
    from service.settings import ServiceSettings

    assert set(config) <= {f"PREFIXSERVE_{k.upper()}" for k in ServiceSettings.model_fields}, "known settings only"
