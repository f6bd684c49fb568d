"""Bias tasks over HTTP and a real Redis: a BitFit checkpoint uploaded as a state dict with a verbalizer and a
template, classified through the template; every bad upload refused with its reason and the store unchanged."""

from __future__ import annotations

import copy
import uuid

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from prefix_store import ArtifactFormatError, BackboneFingerprint, ClassificationHead, PrefixArtifact, encode
from service.app import create_app
from service.runtime import wrap_model
from service.settings import ServiceSettings
from tests.factories import rewrite_blob
from tests.models import MASK_ID, tiny_model, tiny_tokenizer
from tests.service.runtime.test_bitfit import biased_copy, tuned_checkpoint

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def mlm():
    return tiny_model("bert-mlm")


def _client(redis_url, model, tokenizer):
    s = ServiceSettings(redis_url=redis_url, namespace=f"bitfit-{uuid.uuid4().hex[:8]}")
    return TestClient(create_app(s, backbone=wrap_model(copy.deepcopy(model), tokenizer, name="tiny-mlm")))


def _state_dict_part(sd: dict[str, torch.Tensor]):
    return {"state_dict": ("model.safetensors", st_save({k: v.contiguous() for k, v in sd.items()}))}


def _artifact_part(art: PrefixArtifact):
    return {"artifact": ("a.safetensors", encode(art))}


def test_state_dict_upload_with_verbalizer_and_template_classifies_through_them(redis_url, mlm):
    sd = tuned_checkpoint(mlm, 3)
    with _client(redis_url, mlm, tiny_tokenizer(mask=True)) as client:
        r = client.put(
            "/v1/tasks/nli",
            files=_state_dict_part(sd),
            data={"verbalizer": "no=w10,yes=w11", "template": "{text} [MASK]"},
        )
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["method"] == "bitfit" and body["template"] == "{text} [MASK]"
        assert body["head"]["pooling"] == "mask" and body["head"]["token_ids"] == [10, 11]
        assert "encoder.layer.0.attention.self.query" in body["bias_modules"]
        assert "cls.predictions" in body["bias_modules"]

        r = client.post("/v1/classify", json={"task": "nli", "text": "w5 w6 w7"})
        assert r.status_code == 200, r.text
        scores = r.json()["results"][0]["scores"]

        # The reference: the tuned checkpoint itself (its biases loaded), the MLM logits at [MASK] over w10, w11.
        tuned = copy.deepcopy(mlm)
        renamed = {k.replace("LayerNorm.beta", "LayerNorm.bias"): v for k, v in sd.items()}
        tuned.load_state_dict(renamed)
        with torch.no_grad():
            logits = tuned(input_ids=torch.tensor([[5, 6, 7, MASK_ID]])).logits[0, -1, [10, 11]]
        want = torch.softmax(logits, -1).tolist()
        assert scores["no"] == pytest.approx(want[0], abs=1e-5) and scores["yes"] == pytest.approx(want[1], abs=1e-5)

        r = client.post("/v1/classify", json={"task": "nli", "input_ids": [5, 6, 7]})
        assert r.status_code == 400 and "mask token" in r.json()["error"]["message"]

        # Exported back as a state dict, the tuned biases load into the model as they were trained.
        r = client.get("/v1/tasks/nli/state_dict", params={"base_prefix": "bert."})
        assert r.status_code == 200, r.text
        fresh = copy.deepcopy(mlm)
        _, unexpected = fresh.load_state_dict(st_load(r.content), strict=False)
        assert not unexpected
        for name, p in fresh.named_parameters():
            if name.endswith("bias"):
                assert torch.allclose(p, renamed[name], atol=1e-6), name
        assert client.get("/v1/tasks/nli/state_dict", params={"base_prefix": "../x"}).status_code == 422


def _bad(fp: BackboneFingerprint, **kw) -> PrefixArtifact:
    base = dict(task="t", method="bitfit", fingerprint=fp, biases={"encoder.layer.0.output.dense": torch.ones(48)})
    return PrefixArtifact(**(base | kw))


def test_bad_bias_uploads_are_refused_and_leave_the_store_unchanged(redis_url, mlm):
    tok = tiny_tokenizer(mask=True)
    fp = BackboneFingerprint.from_config(mlm.config)
    with _client(redis_url, mlm, tok) as client:
        ok = client.put("/v1/tasks/t", files=_artifact_part(_bad(fp)))
        assert ok.status_code == 201, ok.text

        nan_sd = {"bert.encoder.layer.0.output.dense.bias": torch.full((48,), float("nan"))}
        cases = [
            (
                "unknown module",
                _artifact_part(_bad(fp, biases={"encoder.layer.9.output.dense": torch.ones(48)})),
                {},
                409,
                "does not have",
            ),
            (
                "wrong shape",
                _artifact_part(_bad(fp, biases={"encoder.layer.0.output.dense": torch.ones(7)})),
                {},
                409,
                "expected shape (48,)",
            ),
            ("NaN delta", _state_dict_part(nan_sd), {}, 400, "finite"),
            (
                "verbalizer word of two tokens",
                _state_dict_part(tuned_checkpoint(mlm, 1)),
                {"verbalizer": "a=w5 w6"},
                400,
                "expected one",
            ),
            (
                "verbalizer without '='",
                _state_dict_part(tuned_checkpoint(mlm, 1)),
                {"verbalizer": "a"},
                400,
                "label=word",
            ),
            (
                "bad template",
                _state_dict_part(tuned_checkpoint(mlm, 1)),
                {"template": "{sentence} [MASK]"},
                400,
                "{text}",
            ),
            (
                "not bitfit",
                _state_dict_part({"bert.encoder.layer.0.output.dense.weight": torch.zeros(48, 64)}),
                {},
                400,
                "other than biases",
            ),
            (
                "nothing moved",
                _state_dict_part(
                    {
                        "bert.encoder.layer.0.output.dense.bias": mlm.bert.encoder.layer[0]
                        .output.dense.bias.detach()
                        .clone()
                    }
                ),
                {},
                400,
                "differs",
            ),
        ]
        for what, files, data, status, needle in cases:
            r = client.put("/v1/tasks/t", files=files, data=data)
            assert r.status_code == status, (what, r.status_code, r.text)
            assert needle in r.json()["error"]["message"], (what, r.text)
        # A verbalizer token past the vocabulary cannot be built as an artifact, and forged bytes are refused.
        with pytest.raises(ArtifactFormatError, match="verbalizer token ids"):
            _bad(fp, head=ClassificationHead(None, None, ["a"], "mask", token_ids=[10**6]))
        good = encode(_bad(fp, head=ClassificationHead(None, None, ["a"], "mask", token_ids=[5])))
        forged = rewrite_blob(good, meta_edit=lambda m: m["head"].update(token_ids=[10**6]), fix_checksum=True)
        r = client.put("/v1/tasks/t", files={"artifact": ("a.safetensors", forged)})
        assert r.status_code == 400 and "verbalizer token ids" in r.json()["error"]["message"], r.text
        assert client.get("/v1/tasks/t").json()["versions"] == [1], "no refused upload became a version"


def test_bias_task_on_a_bias_free_backbone_is_409(redis_url):
    llama = tiny_model("llama")
    fp = BackboneFingerprint.from_config(llama.config)
    art = PrefixArtifact(
        task="t", method="bitfit", fingerprint=fp, biases={"layers.0.self_attn.q_proj": torch.ones(64)}
    )
    s = ServiceSettings(redis_url=redis_url, namespace=f"bitfit-{uuid.uuid4().hex[:8]}")
    with TestClient(create_app(s, backbone=wrap_model(llama, None, name="tiny-llama"))) as client:
        r = client.put("/v1/tasks/t", files=_artifact_part(art))
        assert r.status_code == 409 and "no bias terms" in r.json()["error"]["message"], r.text
        assert client.get("/v1/tasks").json() == {"tasks": []}


def test_biased_copy_reference_equals_a_loaded_checkpoint(mlm):
    """The tests' reference (b + delta written into a copy) is what loading the tuned biases gives."""
    sd = tuned_checkpoint(mlm, 5)
    renamed = {k.replace("LayerNorm.beta", "LayerNorm.bias"): v for k, v in sd.items()}
    tuned = copy.deepcopy(mlm)
    tuned.load_state_dict(renamed)
    deltas = {
        k.removeprefix("bert.").removesuffix(".bias"): v - mlm.state_dict()[k]
        for k, v in renamed.items()
        if k.endswith(".bias") and k.startswith("bert.")
    }
    x = torch.tensor([[4, 5, MASK_ID]])
    with torch.no_grad():
        a = biased_copy(mlm, deltas).bert(input_ids=x).last_hidden_state
        b = tuned.bert(input_ids=x).last_hidden_state
    assert torch.allclose(a, b, atol=1e-5)
