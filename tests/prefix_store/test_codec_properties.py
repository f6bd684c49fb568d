"""Property test of the codec: every valid artifact survives encode -> decode, whatever the lengths of its metadata
(task name, labels, training notes, timestamps) and so whatever the length of the safetensors header."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefix_store import METHODS, BackboneFingerprint, ClassificationHead, PrefixArtifact, decode, encode
from prefix_store.artifact import ChannelScale, LowRank
from tests.prefix_store.test_codec import assert_same

FP = BackboneFingerprint(
    model_type="llama", num_layers=2, hidden_size=8, num_attention_heads=2, num_kv_heads=1, head_dim=4, vocab_size=50
)
TASK_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789._-"
JSON_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=300)


@st.composite
def artifacts(draw) -> PrefixArtifact:
    task = draw(st.text(TASK_CHARS, min_size=1, max_size=64).filter(lambda t: t.strip(".")))
    method = draw(st.sampled_from(METHODS))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    P = draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    bias_method = method == "bitfit"
    weight_method = method in ("lora", "ia3")  # per-module tensors, no prompt
    kv_method = method in ("prefix_tuning", "p_tuning_v2") or (bias_method and draw(st.booleans()))
    deep = method == "vpt_deep"
    shape = (FP.num_layers, 2, FP.num_kv_heads, P, FP.head_dim) if kv_method else (P, FP.hidden_size)
    if deep:
        shape = (FP.num_layers, P, FP.hidden_size)
    prefix = torch.randn(shape, generator=g).to(dtype)
    biases = low_rank = scales = None
    if bias_method or weight_method:
        paths = draw(
            st.lists(
                st.from_regex(r"[a-z_]{1,12}(\.[0-9a-z_]{1,12}){0,6}", fullmatch=True),
                min_size=1,
                max_size=8,
                unique=True,
            )
        )
        sizes = {p: (draw(st.integers(1, 40)), draw(st.integers(1, 40)), draw(st.integers(1, 8))) for p in paths}
        if bias_method:
            biases = {p: torch.randn(n, generator=g).to(dtype) for p, (n, _, _) in sizes.items()}
        elif method == "lora":
            scale = st.floats(allow_nan=False, allow_infinity=False, width=64)
            low_rank = {
                p: LowRank(
                    torch.randn(r, i, generator=g).to(dtype), torch.randn(o, r, generator=g).to(dtype), draw(scale)
                )
                for p, (i, o, r) in sizes.items()
            }
        else:
            scales = {
                p: ChannelScale(torch.randn(n, generator=g).to(dtype), draw(st.booleans()))
                for p, (n, _, _) in sizes.items()
            }
    head = None
    labels = draw(st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=6, unique=True) | st.none())
    if labels is not None and draw(st.booleans()):
        ids = draw(st.lists(st.integers(0, FP.vocab_size - 1), min_size=len(labels), max_size=len(labels), unique=True))
        head = ClassificationHead(None, None, labels, "mask", token_ids=ids)
    elif labels is not None:
        weight = torch.randn(len(labels), FP.hidden_size, generator=g).to(dtype)
        bias = torch.randn(len(labels), generator=g).to(dtype) if draw(st.booleans()) else None
        head = ClassificationHead(weight, bias, labels, draw(st.sampled_from(["pooler", "cls", "mean", "last_token"])))
    template = draw(
        st.none()
        | st.builds(lambda a, b: a + "{text}" + b, st.text("ab [MASK]", max_size=20), st.text("xy [MASK]", max_size=20))
    )
    training = draw(
        st.dictionaries(st.text(max_size=30), JSON_TEXT | st.integers() | st.floats(allow_nan=False), max_size=5)
    )
    return PrefixArtifact(
        task=task,
        method=method,
        fingerprint=FP,
        kv=prefix if kv_method else None,
        soft_prompt=None if kv_method or bias_method or weight_method or deep else prefix,
        deep_prompt=prefix if deep else None,
        biases=biases,
        low_rank=low_rank,
        scales=scales,
        template=template,
        head=head,
        version=draw(st.integers(1, 10**9) | st.none()),
        training=training,
        created_at=draw(JSON_TEXT),
    )


@pytest.mark.slow  # 2000 examples: seconds, not the fast tier's
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(artifacts())
def test_every_valid_artifact_round_trips(art):
    assert_same(decode(encode(art)), art)
