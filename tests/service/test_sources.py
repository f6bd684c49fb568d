"""Adapters by reference: PUT /v1/tasks/{task} with {"source": ...}. A PEFT directory or an artifact file under an
allowed directory is published as an upload would be; anything outside the allowed directories (a traversal, a
symbolic link out, no directory allowed at all) is a 403; the hub path maps offline / unreachable to a 503 and a bad
id to a 400, without hanging."""

from __future__ import annotations

import copy
import uuid

import huggingface_hub.constants
import pytest
from fastapi.testclient import TestClient
from peft import PrefixTuningConfig

from prefix_store import BackboneFingerprint, encode
from service.app import create_app
from service.runtime import wrap_model
from service.settings import ServiceSettings
from tests.engine_harness import trained_peft
from tests.factories import make_artifact
from tests.models import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.redis


@pytest.fixture
def served(redis_url, tmp_path):
    llama = tiny_model("llama")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    trained_peft(llama, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), seed=2).save_pretrained(
        allowed / "peft"
    )
    art = make_artifact("x", "p_tuning_v2", P=3, fp=BackboneFingerprint.from_config(llama.config), seed=1)
    (allowed / "art.safetensors").write_bytes(encode(art))
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "art.safetensors").write_bytes(encode(art))
    (allowed / "link").symlink_to(tmp_path / "secret")
    s = ServiceSettings(redis_url=redis_url, namespace=f"src-{uuid.uuid4().hex[:8]}", adapter_dirs=str(allowed))
    app = create_app(s, backbone=wrap_model(copy.deepcopy(llama), tiny_tokenizer(), name="tiny"))
    with TestClient(app) as c:
        yield c, allowed, tmp_path


def test_local_sources_publish_like_uploads(served):
    c, allowed, _ = served
    r = c.put("/v1/tasks/alpha", json={"source": str(allowed / "peft"), "labels": None})
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1 and r.json()["training"]["source"]["kind"] == "path"
    out = c.post("/v1/generate", json={"task": "alpha", "input_ids": [5, 6], "max_new_tokens": 2})
    assert out.status_code == 200 and out.json()["version"] == 1
    r = c.put("/v1/tasks/alpha", json={"source": str(allowed / "art.safetensors")})
    assert r.status_code == 201 and r.json()["version"] == 2 and r.json()["task"] == "alpha"


@pytest.mark.parametrize(
    "source, status, words",
    [
        ("{tmp}/secret/art.safetensors", 403, "outside the directories"),
        ("{allowed}/../secret/art.safetensors", 403, "outside the directories"),
        ("{allowed}/link/art.safetensors", 403, "outside the directories"),  # a symbolic link out
        ("{allowed}/nothing-here", 404, "no such file"),
        ("{allowed}", 404, "adapter_config.json"),  # a directory that is no PEFT adapter
    ],
)
def test_paths_outside_or_missing_are_refused(served, source, status, words):
    c, allowed, tmp = served
    r = c.put("/v1/tasks/beta", json={"source": source.format(tmp=tmp, allowed=allowed)})
    assert r.status_code == status and words in r.json()["error"]["message"], r.text
    assert c.get("/v1/tasks/beta").status_code == 404, "nothing was stored"


def test_no_allowed_directory_means_no_local_source(redis_url, tmp_path):
    s = ServiceSettings(redis_url=redis_url, namespace=f"src-{uuid.uuid4().hex[:8]}")
    with TestClient(create_app(s, backbone=wrap_model(tiny_model("llama"), tiny_tokenizer(), name="t"))) as c:
        r = c.put("/v1/tasks/x", json={"source": str(tmp_path)})
        assert r.status_code == 403 and "PREFIXSERVE_ADAPTER_DIRS" in r.json()["error"]["message"]


def test_hub_sources_fail_clearly_without_the_hub(served, monkeypatch, tmp_path):
    c, _, _ = served
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    r = c.put("/v1/tasks/gamma", json={"source": "someone/some-adapter", "revision": "main"})
    assert r.status_code == 503 and "not in the local cache" in r.json()["error"]["message"], r.text
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    r = c.put("/v1/tasks/gamma", json={"source": "someone/some-adapter"})
    assert r.status_code == 503, r.text
    for body, status, words in [
        ({"source": "not a repo id"}, 400, "hub repository id"),
        ({"source": "a/b", "subfolder": "../x"}, 400, "subfolder"),
        ({"source": "a/b", "token": "x"}, 422, "token"),
        ({"source": "relative/dir", "kind": "path"}, 400, "absolute"),
    ]:
        r = c.put("/v1/tasks/gamma", json=body)
        assert r.status_code == status and words in r.json()["error"]["message"], (body, r.text)
