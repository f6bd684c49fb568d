"""docker-compose.yml and the Kubernetes manifests are valid and wired as documented. The images are built and run
by tests/test_docker.py; no cluster runs here: manifests are checked against the schemas and against each other."""

import copy
import os
import re
import shutil
import subprocess
import urllib.parse
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
    assert redis["image"] == "prefix-serve/redis:7"  # Debian's Redis 7, built by docker/build-base.sh
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


GATEWAY = K8S / "inference-gateway"


def _by_name(docs) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def _gateway_documents() -> dict[tuple[str, str], dict]:
    docs = []
    for path in sorted(GATEWAY.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return _by_name(docs)


def _args(container: dict) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in container["args"])


def _port(container: dict, name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def test_inference_gateway_component_validates_and_is_wired_to_the_base():
    import kubernetes_validate

    from service.metrics import KV_USAGE, LORA_INFO, NUM_RUNNING, NUM_WAITING

    component = yaml.safe_load((GATEWAY / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    listed = set(component["resources"]) | {p["path"] for p in component["patches"]}
    assert listed == {p.name for p in GATEWAY.glob("*.yaml")} - {"kustomization.yaml"}, "every file is used"

    docs = _gateway_documents()
    patch = docs.pop(("Deployment", "prefix-serve"))  # a patch of the base's Deployment, not a whole object
    pool, route = docs.pop(("InferencePool", "prefix-serve")), docs.pop(("HTTPRoute", "prefix-serve"))
    for doc in docs.values():  # the Kubernetes kinds (the two above are CRDs: checked field by field below)
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    base = _by_name(d for _, d in _k8s_documents())
    deployment = copy.deepcopy(base[("Deployment", "prefix-serve")])
    # The patch merged as kustomize's strategic merge does (containers and volumes by name): still a valid object.
    template, added = deployment["spec"]["template"], patch["spec"]["template"]
    template["metadata"]["labels"].update(added["metadata"]["labels"])
    names = {c["name"] for c in template["spec"]["containers"]}
    assert not names & {c["name"] for c in added["spec"]["containers"]}, "the patch adds containers, replaces none"
    template["spec"]["containers"] += added["spec"]["containers"]
    template["spec"]["volumes"] = template["spec"].get("volumes", []) + added["spec"]["volumes"]
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    api, proxy = template["spec"]["containers"][0], template["spec"]["containers"][-1]
    pod_labels = deployment["spec"]["selector"]["matchLabels"]

    # The pool: the API pods on their API port, picked by the EPP's Service.
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["selector"]["matchLabels"] == pod_labels
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [_port(api, "http")]
    epp_service = docs[("Service", pool["spec"]["endpointPickerRef"]["name"])]
    [grpc] = epp_service["spec"]["ports"]
    assert pool["spec"]["endpointPickerRef"]["port"]["number"] == grpc["port"]
    epp_deployment = docs[("Deployment", "prefix-serve-epp")]
    epp_pod = epp_deployment["spec"]["template"]
    assert epp_service["spec"]["selector"] == epp_pod["metadata"]["labels"]
    [epp] = epp_pod["spec"]["containers"]
    assert _port(epp, grpc["targetPort"]) == grpc["port"]

    # The EPP: its pool, its RBAC, its configuration, and where it scrapes.
    args = _args(epp)
    assert args["pool-name"] == pool["metadata"]["name"] and args["pool-group"] == "inference.networking.k8s.io"
    account = epp_pod["spec"]["serviceAccountName"]
    binding = docs[("RoleBinding", account)]
    assert docs[("ServiceAccount", account)] and binding["subjects"][0]["name"] == account
    assert binding["roleRef"]["name"] in {name for kind, name in docs if kind == "Role"}
    mount = next(m for m in epp["volumeMounts"] if args["config-file"].startswith(m["mountPath"] + "/"))
    volume = next(v for v in epp_pod["spec"]["volumes"] if v["name"] == mount["name"])
    config_map = docs[("ConfigMap", volume["configMap"]["name"])]
    config = yaml.safe_load(config_map["data"][args["config-file"].rsplit("/", 1)[1]])
    assert config["kind"] == "EndpointPickerConfig"
    plugins = {p.get("name", p["type"]): p for p in config["plugins"]}
    extractor = plugins["core-metrics-extractor"]["parameters"]
    [engine] = extractor["engineConfigs"]
    assert extractor["defaultEngine"] == engine["name"] == template["metadata"]["labels"]["llm-d.ai/engine-type"]
    # The metric names mapped are the ones the service exports (tests/service/test_gateway_metrics.py scrapes them).
    assert engine["queuedRequestsSpec"] == NUM_WAITING and engine["runningRequestsSpec"] == NUM_RUNNING
    assert engine["kvUsageSpec"] == KV_USAGE and engine["loraSpec"] == LORA_INFO
    for profile in config["schedulingProfiles"]:
        assert {p["pluginRef"] for p in profile["plugins"]} <= set(plugins)
    assert "lora-affinity-scorer" in plugins
    assert plugins["metrics-data-source"]["parameters"]["path"] == "/metrics"
    assert int(args["model-server-metrics-port"]) == _port(proxy, "metrics-proxy"), "it scrapes the proxy"

    # The metrics proxy: GET /metrics on its port, from the API on localhost, with the metrics key's variable.
    mount = next(m for m in proxy["volumeMounts"] if m["mountPath"] == "/etc/nginx/templates")
    volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
    nginx = docs[("ConfigMap", volume["configMap"]["name"])]["data"]["default.conf.template"]
    assert f"listen {_port(proxy, 'metrics-proxy')};" in nginx
    [upstream] = re.findall(r"proxy_pass (\S+);", nginx)
    url = urllib.parse.urlsplit(upstream)
    assert (url.netloc, url.path) == (f"127.0.0.1:{_port(api, 'http')}", "/metrics")
    assert urllib.parse.parse_qs(url.query) == {"name[]": [NUM_WAITING, NUM_RUNNING, KV_USAGE, LORA_INFO]}
    key = next(e for e in proxy["env"] if e["name"] == "PREFIXSERVE_METRICS_KEY")
    assert key["valueFrom"]["secretKeyRef"]["name"] == "prefix-serve-metrics-key"
    assert 'Authorization "Bearer ${PREFIXSERVE_METRICS_KEY}"' in nginx and "limit_except GET" in nginx
    # Only the EPP reaches the proxy's port; the API port stays open.
    policy = docs[("NetworkPolicy", "prefix-serve-metrics-proxy")]["spec"]
    assert policy["podSelector"]["matchLabels"] == pod_labels
    open_rule, epp_rule = policy["ingress"]
    assert "from" not in open_rule and [p["port"] for p in open_rule["ports"]] == ["http"]
    assert epp_rule["from"] == [{"podSelector": {"matchLabels": epp_pod["metadata"]["labels"]}}]
    assert [p["port"] for p in epp_rule["ports"]] == ["metrics-proxy"]

    # The route: the OpenAI routes through the pool, everything else to the base's Service.
    service = base[("Service", "prefix-serve")]
    to_pool, to_service = route["spec"]["rules"]
    assert to_pool["backendRefs"] == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool["metadata"]["name"]}
    ]
    assert {m["path"]["value"] for m in to_pool["matches"]} == {"/v1/completions", "/v1/chat/completions"}
    assert to_service["backendRefs"] == [{"name": "prefix-serve", "port": service["spec"]["ports"][0]["port"]}]
