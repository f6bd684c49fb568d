"""The method registry (prefix_store/methods.py) is the one declaration of every adapter method: each family has its
module on both sides and in the import contracts, every list the product shows is derived from it, and every
registered method goes the whole way: a short training run (or, for a method the trainer does not train yet, a clear
refusal of the job and a PEFT adapter imported instead), upload over the API, served in one engine step mixed with a
task of another family (each row equal to its task alone), and exported back."""

from __future__ import annotations

import copy
import tomllib
import uuid
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from prefix_store import (
    METHODS,
    REGISTRY,
    BackboneFingerprint,
    BackboneKind,
    ClassificationHead,
    Family,
    PrefixArtifact,
    decode,
    encode,
)
from prefix_store.artifact import ChannelScale, LowRank
from prefix_store.jobs import SweepGrid, TrainSpec
from prefix_store.peft_io import export_peft_adapter, import_peft_dir
from service.app import create_app
from service.runtime import EngineRequest, Kind, wrap_model
from service.runtime import methods as serving_families
from service.settings import ServiceSettings
from tests.engine_harness import engine_for, run_engine, stored
from tests.models import tiny_model, tiny_tokenizer
from tests.service.runtime.test_vpt import tiny_vit
from tests.trainer.test_vpt_train import image_folder
from trainer import methods as training_families
from trainer.train import train

ROOT = Path(__file__).resolve().parents[1]
CLS = [{"text": f"w{3 + i % 20} w{5 + i % 7}", "label": "pos" if i % 20 < 10 else "neg"} for i in range(48)]


def test_every_family_has_a_serving_and_a_training_module_in_the_contracts():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    independent = [set(c["modules"]) for c in contracts if c["type"] == "independence"]
    for package in ("service.runtime.methods", "trainer.methods"):
        modules = {f"{package}.{f.value}" for f in Family}
        assert modules in independent, f"an independence contract over {sorted(modules)}"
    assert set(serving_families.FAMILIES) == set(Family)
    assert set(training_families.BUILDERS) == set(Family)


def test_lists_derive_from_the_registry():
    assert TrainSpec.model_json_schema()["properties"]["method"]["enum"] == list(METHODS)
    assert SweepGrid.model_json_schema()["properties"]["methods"]["anyOf"][0]["maxItems"] == len(METHODS)
    schema = create_app(
        ServiceSettings(), backbone=wrap_model(tiny_model("llama"), tiny_tokenizer(), name="tiny")
    ).openapi()
    described = schema["components"]["schemas"]["VersionSummary"]["properties"]["method"]["description"]
    assert all(m in described for m in METHODS)
    for m in REGISTRY.values():
        assert m.trains_on <= m.serves_on, f"{m.name}: trained where it cannot be served"
        assert set(m.defaults) <= set(TrainSpec.model_fields), f"{m.name}: defaults for fields a job lacks"


def _peft_adapter(method: str, tmp_path: Path) -> PrefixArtifact:
    """A SEQ_CLS PEFT adapter of `method` on the tiny BERT classifier, random weights, imported as an upload is."""
    import peft

    from tests.golden.cases import random_weights

    config = {"lora": peft.LoraConfig(r=2, init_lora_weights=False), "ia3": peft.IA3Config()}[method]
    config.task_type = "SEQ_CLS"
    pm = random_weights(peft.get_peft_model(tiny_model("bert-cls"), config), seed=0)
    pm.save_pretrained(tmp_path / "peft-in")
    fp = BackboneFingerprint.from_config(pm.config)
    return import_peft_dir(tmp_path / "peft-in", task="mine", backbone=fp, labels=["x", "y", "z"], method=method)


def _assert_same(want, got, close: bool = False) -> None:
    """Equal tensors, or dicts of equal tensors, LoRA factors or IA3 vectors."""
    if isinstance(want, dict):
        assert want.keys() == got.keys()
        for k in want:
            _assert_same(want[k], got[k], close)
    elif isinstance(want, LowRank):
        _assert_same(want.a, got.a, close)
        _assert_same(want.b, got.b, close)
        assert want.scale == pytest.approx(got.scale, rel=1e-12)
    elif isinstance(want, ChannelScale):
        _assert_same(want.vector, got.vector, close)
        assert want.on_input == got.on_input
    else:
        assert torch.allclose(want, got) if close else torch.equal(want, got)


def _other(method: str, fp, seed: int) -> PrefixArtifact:
    """A task of another family than `method`'s on the same backbone (a key/value prefix next to prompts, a soft
    prompt next to the rest), with a linear head over [CLS]."""
    g = torch.Generator().manual_seed(seed)
    weight, bias = torch.randn(2, fp.hidden_size, generator=g), torch.randn(2, generator=g)
    head = ClassificationHead(weight, bias, ["x", "y"], "cls")
    if REGISTRY[method].family in (Family.SOFT_PROMPT, Family.VISUAL_PROMPT):
        kv = torch.randn(fp.num_layers, 2, fp.num_kv_heads, 2, fp.head_dim, generator=g)
        return PrefixArtifact(task="other", method="p_tuning_v2", fingerprint=fp, kv=kv, head=head)
    soft = torch.randn(2, fp.hidden_size, generator=g)
    return PrefixArtifact(task="other", method="prompt_tuning", fingerprint=fp, soft_prompt=soft, head=head)


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_uploads_serves_mixed_and_exports(method, tmp_path, redis_url):
    image = REGISTRY[method].trains_on == {BackboneKind.IMAGE}
    model, tok = (tiny_vit(), None) if image else (tiny_model("bert-cls").bert, tiny_tokenizer())
    data = {"data": str(image_folder(tmp_path / "images", per_class=8))} if image else {"examples": CLS}
    job = dict(task="mine", method=method, steps=4, eval_every=4, batch_size=8, num_virtual_tokens=3, **data)
    if REGISTRY[method].trains_on:
        art = train(wrap_model(copy.deepcopy(model), tok, name="tiny"), TrainSpec(**job)).artifact  # a real run
    else:  # served from uploads only: a job is refused, by name, when it is submitted
        with pytest.raises(ValidationError, match=f"training {method} is not supported yet"):
            TrainSpec(**job)
        art = _peft_adapter(method, tmp_path)
    assert art.method == method and art.head is not None
    other = _other(method, art.fingerprint, seed=1)
    settings = ServiceSettings(redis_url=redis_url, namespace=f"reg-{uuid.uuid4().hex[:8]}")
    with TestClient(create_app(settings, backbone=wrap_model(copy.deepcopy(model), tok, name="tiny"))) as c:
        for a in (art, other):
            r = c.put(f"/v1/tasks/{a.task}", files={"artifact": ("a.safetensors", encode(a))})
            assert r.status_code == 201, r.text
            assert r.json()["method"] == a.method
        served = c.get("/v1/tasks/mine/artifact")
        assert served.status_code == 200
        back = decode(served.content)
    for name in REGISTRY[method].fields:  # the upload stored exactly what training produced
        _assert_same(getattr(art, name), getattr(back, name))

    engine = engine_for(copy.deepcopy(model), tok)
    mine, theirs = stored(back), stored(other)
    if image:
        g = torch.Generator().manual_seed(2)
        px = [torch.randn(3, 16, 16, generator=g) for _ in range(2)]
        reqs = [EngineRequest("r0", Kind.CLASSIFY, [], mine, pixel_values=px[0])]
        reqs.append(EngineRequest("r1", Kind.CLASSIFY, [], theirs, pixel_values=px[1]))
    else:
        ids = [tok("w4 w9 w11")["input_ids"], tok("w7 w3")["input_ids"]]
        reqs = [EngineRequest.classify("r0", ids[0], mine), EngineRequest.classify("r1", ids[1], theirs)]
    mixed = run_engine(engine, reqs)  # one step, both tasks in one batch
    for req in reqs:
        alone = run_engine(engine_for(copy.deepcopy(model), tok), [req])
        diff = (mixed[req.request_id][-1].logits - alone[req.request_id][-1].logits).abs().max().item()
        assert diff <= 1e-5, f"{req.artifact.method} row in a mixed batch differs from alone by {diff}"

    peft_type = REGISTRY[method].peft_type
    if peft_type is not None:  # PEFT interchange: out and back in, the same tensors
        out = export_peft_adapter(back, tmp_path / "peft")
        again = import_peft_dir(out, task="mine", backbone=back.fingerprint, labels=back.head.labels, method=method)
        for name in REGISTRY[method].fields:
            _assert_same(getattr(back, name), getattr(again, name), close=True)
    else:
        with pytest.raises(Exception, match="PEFT has no adapter type"):
            export_peft_adapter(back, tmp_path / "peft")
