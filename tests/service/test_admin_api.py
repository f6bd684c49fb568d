"""The admin API over a real Redis: upload (PEFT and native), list, inspect, delete, roll back, auth, errors."""

import copy
import uuid

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PrefixTuningConfig, get_peft_model

from prefix_store import BackboneFingerprint, encode
from service.app import create_app
from service.runtime import wrap_model
from service.settings import ServiceSettings
from tests.factories import make_artifact, rewrite_blob
from tests.models import tiny_model

pytestmark = pytest.mark.redis


def _peft_dir(tmp_path, base, P=4, seed=1):
    pm = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P))
    torch.manual_seed(seed)
    for p in pm.parameters():
        if p.requires_grad:
            p.data.normal_()
    out = tmp_path / f"adapter-{seed}"
    pm.save_pretrained(out)
    return out


def _files(adapter_dir):
    return {
        "adapter_config": ("adapter_config.json", (adapter_dir / "adapter_config.json").read_bytes()),
        "adapter_model": ("adapter_model.safetensors", (adapter_dir / "adapter_model.safetensors").read_bytes()),
    }


@pytest.fixture
def bert():
    return tiny_model("bert-cls")


def _client(redis_url, model, **settings):
    s = ServiceSettings(redis_url=redis_url, namespace=f"api-{uuid.uuid4().hex[:8]}", **settings)
    return TestClient(create_app(s, backbone=wrap_model(model.bert, None, name="tiny-bert")))


def test_upload_list_inspect_rollback_delete(redis_url, bert, tmp_path):
    with _client(redis_url, bert) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/ready").json()["ready"] is True
        assert client.get("/v1/tasks").json() == {"tasks": []}

        r = client.put("/v1/tasks/sentiment", files=_files(_peft_dir(tmp_path, bert)), data={"labels": "neg,neu,pos"})
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["version"] == 1 and body["method"] == "p_tuning_v2" and body["num_virtual_tokens"] == 4
        assert body["head"] == {"labels": ["neg", "neu", "pos"], "pooling": "pooler", "bias": True, "token_ids": None}

        r = client.put(
            "/v1/tasks/sentiment",
            files=_files(_peft_dir(tmp_path, bert, P=6, seed=2)),
            data={"labels": '["a","b","c"]'},
        )
        assert r.json()["version"] == 2
        native = make_artifact("ignored-name", fp=BackboneFingerprint.from_config(bert.config), P=3)
        r = client.put("/v1/tasks/other", files={"artifact": ("a.safetensors", encode(native))})
        assert r.status_code == 201 and r.json()["task"] == "other"

        tasks = {t["task"]: t for t in client.get("/v1/tasks").json()["tasks"]}
        assert tasks["sentiment"]["current_version"] == 2 and tasks["sentiment"]["versions"] == [1, 2]
        assert tasks["sentiment"]["current"]["num_virtual_tokens"] == 6

        detail = client.get("/v1/tasks/sentiment").json()
        assert [h["version"] for h in detail["history"]] == [1, 2]

        r = client.post("/v1/tasks/sentiment/rollback", json={"version": 1})
        assert r.status_code == 200 and r.json()["version"] == 1
        assert client.get("/v1/tasks/sentiment").json()["current_version"] == 1

        assert client.delete("/v1/tasks/sentiment", params={"version": 1}).status_code == 409
        assert client.delete("/v1/tasks/sentiment", params={"version": 2}).status_code == 204
        assert client.delete("/v1/tasks/sentiment").status_code == 204
        assert client.get("/v1/tasks/sentiment").status_code == 404
        assert [t["task"] for t in client.get("/v1/tasks").json()["tasks"]] == ["other"]


def test_upload_errors_name_what_was_wrong(redis_url, bert, tmp_path):
    with _client(redis_url, bert, max_artifact_bytes=64 * 1024) as client:
        files = _files(_peft_dir(tmp_path, bert))

        def put(task="t", **kw):
            r = client.put(f"/v1/tasks/{task}", **kw)
            return r.status_code, r.json()["error"]["message"]

        assert put("Bad Name", files=files)[0] == 400
        status, msg = put(files={"adapter_config": files["adapter_config"]})
        assert status == 400 and "either the two parts" in msg
        status, msg = put(files={"artifact": ("x.bin", b"\x80\x04\x95pickled")})
        assert status == 400 and "pickle" in msg
        status, msg = put(files={"artifact": ("x", b"\0" * (70 * 1024))})
        assert status == 413 and "limit of 65536" in msg

        fp = BackboneFingerprint.from_config(bert.config)
        nan_blob = rewrite_blob(encode(make_artifact("t", fp=fp)), tensor_edit=_poison, fix_checksum=True)
        status, msg = put(files={"artifact": ("a", nan_blob)})
        assert status == 400 and "NaN/inf" in msg
        bad_shape = rewrite_blob(encode(make_artifact("t", fp=fp)), tensor_edit=_widen, fix_checksum=True)
        status, msg = put(files={"artifact": ("a", bad_shape)})
        assert status == 400 and "H_kv" in msg

        other = tiny_model("llama")  # a prefix for another backbone
        wrong = make_artifact("t", fp=BackboneFingerprint.from_config(other.config))
        status, msg = put(files={"artifact": ("a", encode(wrong))})
        assert status == 409 and "model_type: prefix has 'llama', backbone has 'bert'" in msg

        llama_adapter = _peft_dir(tmp_path, tiny_model("llama-cls"))
        status, msg = put(files=_files(llama_adapter))
        assert status == 409 and "num_layers" in msg

        status, msg = put(files=files, data={"labels": "a,b"})
        assert status == 400 and "head has 3 classes, got 2 names" in msg
        status, msg = put(files=files, data={"labels": "[1, 2"})
        assert status == 400 and "labels" in msg

        assert client.post("/v1/tasks/none/rollback", json={"version": 1}).status_code == 404
        r = client.post("/v1/tasks/none/rollback", json={"version": 0})
        assert r.status_code == 422 and "version" in r.json()["error"]["message"]
        assert client.get("/v1/tasks").json() == {"tasks": []}  # nothing bad was stored


def _poison(tensors):
    tensors["kv"][0, 0, 0, 0, 0] = float("nan")


def _widen(tensors):
    L, _, H, P, D = tensors["kv"].shape
    tensors["kv"] = torch.randn(L, 2, H + 1, P, D)


def test_auth_matrix(redis_url, bert):
    with _client(redis_url, bert, api_keys=["user-key"], admin_keys=["admin-key"]) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/v1/tasks").status_code == 401
        assert client.get("/v1/tasks", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = client.get("/v1/tasks", headers={"Authorization": "Bearer user-key"})
        assert r.status_code == 403 and "admin key" in r.json()["error"]["message"]
        assert client.get("/v1/tasks", headers={"Authorization": "Bearer admin-key"}).status_code == 200


def test_store_down_is_503(bert):
    s = ServiceSettings(redis_url="redis://127.0.0.1:1", namespace="x")
    app = create_app(s, backbone=wrap_model(bert.bert, None, name="tiny-bert"))
    with TestClient(app) as client:
        r = client.get("/v1/tasks")
        assert r.status_code == 503 and "Redis unreachable" in r.json()["error"]["message"]
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["checks"]["backbone"] is True


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("PREFIXSERVE_API_KEYS", "a, b")
    monkeypatch.setenv("PREFIXSERVE_DTYPE", "bfloat16")
    s = ServiceSettings()
    assert s.api_keys == ["a", "b"] and s.dtype == "bfloat16" and s.auth_enabled
    monkeypatch.setenv("PREFIXSERVE_DTYPE", "float64")
    with pytest.raises(ValueError, match="dtype"):
        ServiceSettings()
