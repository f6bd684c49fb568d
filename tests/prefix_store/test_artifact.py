import pytest
import torch
from transformers import BertConfig, GPT2Config, LlamaConfig, Qwen2Config

from prefix_store import (
    ArtifactFormatError,
    ArtifactShapeError,
    BackboneFingerprint,
    BackboneMismatch,
    ClassificationHead,
    InvalidTaskName,
    NonFiniteTensorError,
    PrefixArtifact,
    validate_task_name,
)
from prefix_store.artifact import ChannelScale, LowRank
from tests.factories import TINY_LLAMA, make_artifact


@pytest.mark.parametrize("name", ["a", "sst2", "e2e.v2", "my_task-1", "x" * 64])
def test_valid_task_names(name):
    assert validate_task_name(name) == name


@pytest.mark.parametrize("name", ["", "A", "has space", "x" * 65, "ü", "a/b", "a:b", None, 3])
def test_invalid_task_names(name):
    with pytest.raises(InvalidTaskName, match="lower-case letters"):
        validate_task_name(name)


@pytest.mark.parametrize(
    "config, expected",
    [
        (GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=100), ("gpt2", 3, 64, 4, 4, 16, 100)),
        (
            LlamaConfig(
                hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3, vocab_size=100
            ),
            ("llama", 3, 64, 8, 2, 8, 100),
        ),
        (
            Qwen2Config(
                hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2, vocab_size=120
            ),
            ("qwen2", 2, 64, 8, 2, 8, 120),
        ),
        (BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4), ("bert", 2, 48, 4, 4, 12, 30522)),
    ],
)
def test_fingerprint_from_config(config, expected):
    fp = BackboneFingerprint.from_config(config)
    got = (
        fp.model_type,
        fp.num_layers,
        fp.hidden_size,
        fp.num_attention_heads,
        fp.num_kv_heads,
        fp.head_dim,
        fp.vocab_size,
    )
    assert got == expected
    assert len(fp.digest) == 16 and BackboneFingerprint.from_dict(fp.to_dict()) == fp


def test_fingerprint_mismatch_names_each_difference():
    other = BackboneFingerprint("llama", 4, 64, 8, 4, 8, 100)
    with pytest.raises(BackboneMismatch) as e:
        TINY_LLAMA.require_match(other)
    assert "num_layers: prefix has 3, backbone has 4" in str(e.value)
    assert "num_kv_heads: prefix has 2, backbone has 4" in str(e.value)


def test_fingerprint_digest_tamper_is_detected():
    d = TINY_LLAMA.to_dict() | {"digest": "0" * 16}
    with pytest.raises(ArtifactFormatError, match="digest"):
        BackboneFingerprint.from_dict(d)


def test_kv_shape_must_match_backbone():
    with pytest.raises(
        ArtifactShapeError, match=r"expected \(L, 2, H_kv, P, D\) = \(3, 2, 2, 'P', 8\), got \(3, 2, 8, 5, 8\)"
    ):
        PrefixArtifact(task="t", method="prefix_tuning", fingerprint=TINY_LLAMA, kv=torch.zeros(3, 2, 8, 5, 8))


def test_soft_prompt_shape_must_match_hidden():
    with pytest.raises(ArtifactShapeError, match=r"expected \(P, hidden\) = \('P', 64\), got \(4, 32\)"):
        PrefixArtifact(task="t", method="prompt_tuning", fingerprint=TINY_LLAMA, soft_prompt=torch.zeros(4, 32))


def test_method_carries_its_own_tensor():
    with pytest.raises(ArtifactFormatError, match=r"method p_tuning carries 'soft_prompt'; got \['kv'\]"):
        PrefixArtifact(task="t", method="p_tuning", fingerprint=TINY_LLAMA, kv=torch.zeros(3, 2, 2, 5, 8))
    with pytest.raises(ArtifactFormatError, match="unknown method"):
        PrefixArtifact(task="t", method="dora", fingerprint=TINY_LLAMA, kv=torch.zeros(3, 2, 2, 5, 8))
    with pytest.raises(ArtifactFormatError, match="method lora carries no prompt tensor"):
        PrefixArtifact(task="t", method="lora", fingerprint=TINY_LLAMA, kv=torch.zeros(3, 2, 2, 5, 8))


def test_low_rank_and_scale_artifacts_are_checked():
    a, b = torch.randn(4, 64), torch.randn(16, 4)
    art = PrefixArtifact("t", "lora", TINY_LLAMA, low_rank={"layers.0.self_attn.v_proj": LowRank(a, b, 2.0)})
    assert art.dtype == torch.float32 and art.summary()["lora_modules"] == {
        "layers.0.self_attn.v_proj": {"rank": 4, "scale": 2.0}
    }
    with pytest.raises(ArtifactFormatError, match="method lora: expected low_rank for at least one module"):
        PrefixArtifact("t", "lora", TINY_LLAMA)
    with pytest.raises(ArtifactShapeError, match=r"expected A \(r, in\) and B \(out, r\)"):
        PrefixArtifact("t", "lora", TINY_LLAMA, low_rank={"q": LowRank(a, b.T, 2.0)})
    with pytest.raises(ArtifactFormatError, match="scale: expected a finite number"):
        PrefixArtifact("t", "lora", TINY_LLAMA, low_rank={"q": LowRank(a, b, float("nan"))})
    with pytest.raises(ArtifactFormatError, match="method ia3 carries no low_rank"):
        PrefixArtifact(
            "t", "ia3", TINY_LLAMA, low_rank={"q": LowRank(a, b, 1.0)}, scales={"q": ChannelScale(torch.ones(4))}
        )
    with pytest.raises(ArtifactShapeError, match=r"scales q: expected a vector"):
        PrefixArtifact("t", "ia3", TINY_LLAMA, scales={"q": ChannelScale(torch.ones(4, 1))})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_rejected(bad):
    kv = torch.randn(3, 2, 2, 5, 8)
    kv[1, 0, 1, 2, 3] = bad
    with pytest.raises(NonFiniteTensorError, match="1 NaN/inf of 480"):
        PrefixArtifact(task="t", method="p_tuning_v2", fingerprint=TINY_LLAMA, kv=kv)


def test_head_validation():
    art = make_artifact(labels=["neg", "pos"])
    bad_shape = ClassificationHead(torch.zeros(2, 10), None, ["neg", "pos"], "pooler")
    with pytest.raises(ArtifactShapeError, match=r"head.weight shape: expected \(C, hidden\) = \(2, 64\)"):
        PrefixArtifact(task="t", method="prefix_tuning", fingerprint=TINY_LLAMA, kv=art.kv, head=bad_shape)
    dup = ClassificationHead(torch.zeros(2, 64), None, ["a", "a"], "pooler")
    with pytest.raises(ArtifactFormatError, match="distinct"):
        PrefixArtifact(task="t", method="prefix_tuning", fingerprint=TINY_LLAMA, kv=art.kv, head=dup)
    pooling = ClassificationHead(torch.zeros(2, 64), None, ["a", "b"], "max")
    with pytest.raises(ArtifactFormatError, match="pooling"):
        PrefixArtifact(task="t", method="prefix_tuning", fingerprint=TINY_LLAMA, kv=art.kv, head=pooling)


def test_cast_and_summary():
    art = make_artifact(labels=["a", "b", "c"]).to(torch.bfloat16)
    s = art.summary()
    assert s["dtype"] == "bfloat16" and s["num_virtual_tokens"] == 5
    assert s["bytes"] == (3 * 2 * 2 * 5 * 8 + 3 * 64 + 3) * 2
    assert s["backbone"]["digest"] == TINY_LLAMA.digest
