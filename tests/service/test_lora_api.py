"""PEFT LoRA and IA3 adapter directories uploaded as they are (multipart over HTTP, and the admin CLI), served through
/v1/generate with PEFT's own greedy tokens, and the server's refusals as 400s naming what is not served (DoRA, a
rank over PREFIXSERVE_MAX_LORA_RANK). The backbone is loaded the way the service loads it (load_backbone with the
settings' arguments), from a tiny Llama saved to disk."""

from __future__ import annotations

import copy
import json
import uuid

import pytest
import torch
from fastapi.testclient import TestClient
from peft import IA3Config, LoraConfig, get_peft_model
from safetensors.torch import load, save

from service.app import create_app
from service.runtime import load_backbone
from service.settings import ServiceSettings
from tests.golden.cases import STEPS, peft_generate, random_weights
from tests.models import tiny_model, tiny_tokenizer
from tests.service.live import live_server
from tests.service.test_admin_api import _files
from tests.service.test_cli import cli

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _app(model_dir, redis_url, **settings):
    s = ServiceSettings(
        redis_url=redis_url, namespace=f"lora-{uuid.uuid4().hex[:8]}", backbone=str(model_dir), **settings
    )
    return create_app(s, backbone=load_backbone(**s.backbone_args() | {"local_files_only": True}))


def _adapter(tmp_path, name: str, config, seed: int):
    pm = random_weights(get_peft_model(copy.deepcopy(tiny_model("llama")), config), seed)
    pm.save_pretrained(tmp_path / name)
    return pm, tmp_path / name


def test_peft_lora_and_ia3_uploads_serve_peft_greedy_tokens(model_dir, redis_url, tmp_path):
    lora, lora_dir = _adapter(tmp_path, "lora", LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False), 1)
    ia3, ia3_dir = _adapter(tmp_path, "ia3", IA3Config(task_type="CAUSAL_LM"), 2)
    with TestClient(_app(model_dir, redis_url)) as client:
        r = client.put("/v1/tasks/lo", files=_files(lora_dir))
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["method"] == "lora" and body["num_virtual_tokens"] == 0
        assert body["lora_modules"]["layers.0.self_attn.q_proj"] == {"rank": 4, "scale": 2.0}
        r = client.put("/v1/tasks/ia", files=_files(ia3_dir))
        assert r.status_code == 201 and r.json()["method"] == "ia3", r.text
        assert r.json()["scaled_modules"]["layers.1.mlp.down_proj"] == "input"
        ids = [5, 9, 17, 33, 8]
        for task, pm in (("lo", lora), ("ia", ia3)):
            want, _ = peft_generate(pm, ids)
            body = {"task": task, "input_ids": ids, "max_new_tokens": STEPS, "ignore_eos": True}
            r = client.post("/v1/generate", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["token_ids"] == want


def test_unserved_lora_forms_are_400s_naming_why(model_dir, redis_url, tmp_path):
    _, dora = _adapter(tmp_path, "dora", LoraConfig(task_type="CAUSAL_LM", r=4, use_dora=True), 3)
    _, wide = _adapter(tmp_path, "wide", LoraConfig(task_type="CAUSAL_LM", r=8, init_lora_weights=False), 4)
    with TestClient(_app(model_dir, redis_url, max_lora_rank=4)) as client:
        r = client.put("/v1/tasks/d", files=_files(dora))
        assert r.status_code == 400 and "DoRA" in r.text, r.text
        r = client.put("/v1/tasks/w", files=_files(wide))
        assert r.status_code == 400 and "over this server's limit of 4 (PREFIXSERVE_MAX_LORA_RANK)" in r.text, r.text
        assert client.get("/v1/tasks").json() == {"tasks": []}


def test_malformed_configs_and_stray_tensors_are_400s_naming_why(model_dir, redis_url, tmp_path):
    """Config fields of the wrong type used to crash the import (500s); tensors of modules the config does not
    target were served though PEFT drops them."""
    config = LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"], init_lora_weights=False)
    _, adapter = _adapter(tmp_path, "a", config, 7)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    stray = load(weights) | {
        "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight": torch.ones(2, 64),
        "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight": torch.ones(64, 2),
    }
    uploads = [
        (cfg | {"r": 0}, weights, "r: expected a positive integer"),
        (cfg | {"modules_to_save": 5}, weights, "modules_to_save: expected a list of module names"),
        (cfg | {"rank_pattern": {"((?:a{1000}){1000}){10}": 2}}, weights, "repeat counts multiply to"),
        (cfg, save(stray), "not targeted by the config"),
    ]
    with TestClient(_app(model_dir, redis_url)) as client:
        for config_json, model, message in uploads:
            files = {
                "adapter_config": ("adapter_config.json", json.dumps(config_json).encode()),
                "adapter_model": ("adapter_model.safetensors", model),
            }
            r = client.put("/v1/tasks/bad", files=files)
            assert r.status_code == 400 and message in r.text, r.text
        assert client.get("/v1/tasks").json() == {"tasks": []}


@pytest.mark.slow
def test_the_cli_uploads_a_peft_lora_directory(model_dir, redis_url, tmp_path):
    _, lora_dir = _adapter(tmp_path, "lora", LoraConfig(task_type="CAUSAL_LM", r=2, init_lora_weights=False), 5)
    _, ia3_dir = _adapter(tmp_path, "ia3", IA3Config(task_type="CAUSAL_LM"), 6)
    with live_server(_app(model_dir, redis_url)) as url:
        r = cli(url, "tasks", "upload", "lo", str(lora_dir))
        assert r.returncode == 0 and r.stdout.strip() == "lo version 1 is current (lora)", r
        r = cli(url, "tasks", "upload", "ia", str(ia3_dir))
        assert r.returncode == 0 and r.stdout.strip() == "ia version 1 is current (ia3)", r
