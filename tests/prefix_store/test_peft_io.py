"""PEFT save_pretrained -> import -> Redis -> export -> PeftModel.from_pretrained keeps every tensor."""

import copy
import json

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from prefix_store import (
    ArtifactFormatError,
    ArtifactShapeError,
    BackboneFingerprint,
    BackboneMismatch,
    UnsupportedAdapter,
    export_peft_adapter,
    import_peft_adapter,
    import_peft_dir,
)
from tests.models import tiny_model

CASES = {
    "gpt2-prefix-projection": (
        "gpt2",
        PrefixTuningConfig,
        dict(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=32),
    ),
    "llama-gqa-prefix": ("llama", PrefixTuningConfig, dict(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    "qwen2-gqa-prefix": ("qwen2", PrefixTuningConfig, dict(task_type="CAUSAL_LM", num_virtual_tokens=6)),
    "llama-prompt-tuning": ("llama", PromptTuningConfig, dict(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "gpt2-p-tuning-mlp": (
        "gpt2",
        PromptEncoderConfig,
        dict(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32),
    ),
    "gpt2-p-tuning-lstm": (
        "gpt2",
        PromptEncoderConfig,
        dict(
            task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32, encoder_reparameterization_type="LSTM"
        ),
    ),
    "bert-seqcls-prefix": ("bert-cls", PrefixTuningConfig, dict(task_type="SEQ_CLS", num_virtual_tokens=4)),
    "bert-seqcls-prompt": ("bert-cls", PromptTuningConfig, dict(task_type="SEQ_CLS", num_virtual_tokens=2)),
    "llama-seqcls-prefix": ("llama-cls", PrefixTuningConfig, dict(task_type="SEQ_CLS", num_virtual_tokens=3)),
}


def _trained_adapter(kind, config_cls, kwargs, out_dir):
    base = tiny_model(kind)
    pm = get_peft_model(copy.deepcopy(base), config_cls(**kwargs))
    torch.manual_seed(1)
    for p in pm.parameters():
        if p.requires_grad:  # random, not PEFT's near-zero init, so a layout slip shows up in the logits
            p.data.normal_()
    pm.eval()
    pm.save_pretrained(out_dir)
    return base, pm


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.peft_reference("seq_cls")) if c.endswith("seqcls-prefix") else c for c in CASES],
)
async def test_peft_import_store_export_reload(case, tmp_path, store):
    kind, config_cls, kwargs = CASES[case]
    base, original = _trained_adapter(kind, config_cls, kwargs, tmp_path / "peft")
    fp = BackboneFingerprint.from_config(base.config)
    labels = ["a", "b", "c"] if kwargs["task_type"] == "SEQ_CLS" else None

    art = import_peft_dir(tmp_path / "peft", task="imported", backbone=fp, labels=labels)
    stored = await store.put(art)
    fetched = await store.get("imported", stored.version)
    export_peft_adapter(fetched, tmp_path / "export")

    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    exported = load_file(tmp_path / "export" / "adapter_model.safetensors")
    assert saved.keys() == exported.keys()
    for key in saved:
        assert torch.equal(saved[key], exported[key]), key

    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "export").eval()
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = original(input_ids=ids, attention_mask=mask).logits
        b = reloaded(input_ids=ids, attention_mask=mask).logits
    # P-Tuning's LSTM runs in the original on every call and is folded into a table in the export: float noise.
    assert (a - b).abs().max() <= 1e-5
    if fetched.head is not None:
        assert fetched.head.labels == labels


def test_prefix_layout_matches_peft_cache(tmp_path):
    """Our (L, 2, H_kv, P, D) tensor is exactly what PEFT puts in each layer's cache."""
    base, pm = _trained_adapter(
        "llama", PrefixTuningConfig, dict(task_type="CAUSAL_LM", num_virtual_tokens=4), tmp_path
    )
    art = import_peft_dir(tmp_path, task="t", backbone=BackboneFingerprint.from_config(base.config))
    assert art.method == "p_tuning_v2" and tuple(art.kv.shape) == (3, 2, 2, 4, 8)
    cache = pm.get_prompt(batch_size=1)
    for layer in range(3):
        keys, values = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # (H_kv, P, D)
        assert torch.equal(keys, art.kv[layer, 0]) and torch.equal(values, art.kv[layer, 1])


def _adapter_bytes(tmp_path, kind="llama", **kw):
    base, _ = _trained_adapter(
        kind, PrefixTuningConfig, dict(task_type="CAUSAL_LM", num_virtual_tokens=4, **kw), tmp_path
    )
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    return BackboneFingerprint.from_config(base.config), cfg, (tmp_path / "adapter_model.safetensors").read_bytes()


def test_rejects_other_backbone(tmp_path):
    fp, cfg, weights = _adapter_bytes(tmp_path)
    deeper = BackboneFingerprint(**{**fp.__dict__, "num_layers": 4})
    with pytest.raises(BackboneMismatch, match="num_layers: adapter has 3, backbone has 4"):
        import_peft_adapter(cfg, weights, task="t", backbone=deeper)


def test_rejects_pre_gqa_prefix(tmp_path):
    fp, cfg, _ = _adapter_bytes(tmp_path)
    cfg.update(token_dim=64, num_attention_heads=8)  # what PEFT < 0.12 wrote for this GQA model
    weights = st_save({"prompt_embeddings": torch.randn(4, 2 * 3 * 64)})
    with pytest.raises(BackboneMismatch, match="token_dim=H_kv·D=16"):
        import_peft_adapter(cfg, weights, task="t", backbone=fp)


def test_rejects_unsupported_types_and_files(tmp_path):
    fp, cfg, weights = _adapter_bytes(tmp_path)
    with pytest.raises(UnsupportedAdapter, match="got 'LORA'"):
        import_peft_adapter({**cfg, "peft_type": "LORA"}, weights, task="t", backbone=fp)
    with pytest.raises(UnsupportedAdapter, match="task_type"):
        import_peft_adapter({**cfg, "task_type": "SEQ_2_SEQ_LM"}, weights, task="t", backbone=fp)
    with pytest.raises(UnsupportedAdapter, match="num_transformer_submodules"):
        import_peft_adapter({**cfg, "num_transformer_submodules": 2}, weights, task="t", backbone=fp)
    with pytest.raises(ArtifactFormatError, match="pickle"):
        import_peft_adapter(cfg, b"\x80\x04\x95" + b"\0" * 64, task="t", backbone=fp)
    with pytest.raises(ArtifactFormatError, match="not valid JSON"):
        import_peft_adapter(b"{nope", weights, task="t", backbone=fp)
    with pytest.raises(ArtifactShapeError, match="num_virtual_tokens=9"):
        import_peft_adapter({**cfg, "num_virtual_tokens": 9}, weights, task="t", backbone=fp)
    with pytest.raises(UnsupportedAdapter, match="method 'prompt_tuning' cannot come from a PREFIX_TUNING"):
        import_peft_adapter(cfg, weights, task="t", backbone=fp, method="prompt_tuning")
    extra = st_save({"prompt_embeddings": torch.randn(4, 96), "base_model.lm_head.weight": torch.randn(2, 2)})
    with pytest.raises(UnsupportedAdapter, match="lm_head"):
        import_peft_adapter(cfg, extra, task="t", backbone=fp)


def test_rejects_soft_prompt_of_other_width(tmp_path):
    base, _ = _trained_adapter("llama", PromptTuningConfig, dict(task_type="CAUSAL_LM", num_virtual_tokens=2), tmp_path)
    narrow = BackboneFingerprint(**{**BackboneFingerprint.from_config(base.config).__dict__, "hidden_size": 32})
    with pytest.raises(BackboneMismatch, match="adapter has 64, backbone hidden size is 32"):
        import_peft_dir(tmp_path, task="t", backbone=narrow)


def test_seq_cls_label_count_must_match(tmp_path):
    base, _ = _trained_adapter(
        "bert-cls", PrefixTuningConfig, dict(task_type="SEQ_CLS", num_virtual_tokens=2), tmp_path
    )
    with pytest.raises(ArtifactShapeError, match="head has 3 classes, got 2 names"):
        import_peft_dir(tmp_path, task="t", backbone=BackboneFingerprint.from_config(base.config), labels=["x", "y"])


def test_method_follows_prefix_projection(tmp_path):
    fp, cfg, weights = _adapter_bytes(tmp_path, kind="gpt2", prefix_projection=True, encoder_hidden_size=16)
    assert import_peft_adapter(cfg, weights, task="t", backbone=fp).method == "prefix_tuning"
    assert import_peft_adapter(cfg, weights, task="t", backbone=fp, method="p_tuning_v2").method == "p_tuning_v2"
