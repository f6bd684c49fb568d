"""Bias adapters (bitfit) served mixed with every other method: each row equals its task run alone through a
reference that shares nothing with the serving code (a copy of the backbone with `b + delta` written into its
biases, run by transformers' own forward, the prefix given as a cache, soft prompts as input embeddings); fp32,
|dlogit| <= 1e-5, the same greedy tokens. Plus: the deltas move the logits (control), the tied decoder bias counted
once, a bias task refused by a bias-free backbone, checkpoints imported and exported. The engine is driven directly
(no Redis), the artifacts as the store hands them back."""

from __future__ import annotations

import copy

import pytest
import torch

from prefix_store import BackboneFingerprint, BackboneMismatch, ClassificationHead, PrefixArtifact
from prefix_store.bitfit_io import export_bias_state_dict, import_bias_checkpoint
from prefix_store.errors import UnsupportedAdapter
from service.runtime import wrap_model
from service.runtime.bias import bias_targets, checkpoint_references
from service.runtime.methods import check as check_artifact
from tests.golden.cases import Case, assert_matches, differences, run
from tests.models import MASK_ID, tiny_model, tiny_tokenizer
from tests.references import biased_copy, prefix_cache, random_deltas, reference_generate

LABELS = ["neg", "pos", "mid"]


@torch.no_grad()
def reference_classify(model, ids: list[int], art: PrefixArtifact) -> torch.Tensor:
    """Head logits (C,) of one row alone on a biased copy of a BertForMaskedLM: a verbalizer reads the MLM logits at
    [MASK] at its tokens; a linear head reads [CLS]."""
    m = biased_copy(model, art.biases)
    x = torch.tensor([ids])
    head = art.head
    assert head is not None
    kw = {}
    if art.kv is not None:
        kw = dict(past_key_values=prefix_cache(art.kv), attention_mask=torch.ones(1, art.kv.shape[3] + len(ids)))
    if art.soft_prompt is not None:
        embeds = torch.cat([art.soft_prompt[None], m.bert.embeddings.word_embeddings(x)], 1)
        kw = dict(inputs_embeds=embeds)
    else:
        kw["input_ids"] = x
    out = m(**kw, output_hidden_states=True)
    if head.verbalizer:
        offset = 0 if art.soft_prompt is None else art.soft_prompt.shape[0]
        return out.logits[0, offset + ids.index(MASK_ID), head.token_ids]
    return out.hidden_states[-1][0, 0] @ head.weight.T + head.bias


# -- artifacts -----------------------------------------------------------------------------------------------------
def artifact(model, task: str, seed: int, *, biases=True, only=None, P=0, soft=0, head=None) -> PrefixArtifact:
    fp = BackboneFingerprint.from_config(model.config)
    g = torch.Generator().manual_seed(100 + seed)
    kv = torch.randn(fp.num_layers, 2, fp.num_kv_heads, P, fp.head_dim, generator=g) if P else None
    sp = 0.5 * torch.randn(soft, fp.hidden_size, generator=g) if soft else None
    method = "bitfit" if biases else ("p_tuning_v2" if P else "prompt_tuning")
    return PrefixArtifact(
        task=task,
        method=method,
        fingerprint=fp,
        kv=kv,
        soft_prompt=sp,
        biases=random_deltas(model, seed, only) if biases else None,
        head=head,
    )


def verbalizer(ids: list[int]) -> ClassificationHead:
    return ClassificationHead(None, None, LABELS[: len(ids)], "mask", token_ids=ids)


def linear(hidden: int, seed: int) -> ClassificationHead:
    g = torch.Generator().manual_seed(seed)
    return ClassificationHead(torch.randn(3, hidden, generator=g), torch.randn(3, generator=g), LABELS, "cls")


# -- cases ----------------------------------------------------------------------------------------------------------
def gpt2_case() -> Case:
    """Three bias tasks (one shifting only the LayerNorms), a key/value prefix, a soft prompt, bias + prefix, and the
    bare backbone, prompts of different lengths."""
    model = tiny_model("gpt2")
    arts = [
        artifact(model, "b1", 1),
        artifact(model, "b2", 2),
        artifact(model, "b3", 3, only="ln_"),
        artifact(model, "ptv2", 4, biases=False, P=5),
        artifact(model, "soft", 5, biases=False, soft=3),
        artifact(model, "bp", 6, P=4),
        None,
    ]
    torch.manual_seed(0)
    prompts = [torch.randint(3, 120, (n,)).tolist() for n in (5, 9, 3, 7, 4, 6, 8)]
    refs = [reference_generate(model, ids, a) for ids, a in zip(prompts, arts, strict=True)]
    return Case(
        "gpt2",
        [a.task if a else None for a in arts],
        {a.task: a for a in arts if a},
        prompts,
        [True] * len(arts),
        [t for t, _ in refs],
        [lg for _, lg in refs],
    )


def bert_case() -> Case:
    """On a BertForMaskedLM: verbalizer bias tasks (body, transform and decoder-bias deltas), a bias task with a
    linear head, bias + prefix + verbalizer, a prefix task and a soft-prompt task with a verbalizer."""
    model = tiny_model("bert-mlm")
    hidden = model.config.hidden_size
    arts = [
        artifact(model, "v1", 1, head=verbalizer([10, 20])),
        artifact(model, "v2", 2, head=verbalizer([30, 40, 50])),
        artifact(model, "lin", 3, head=linear(hidden, 3)),
        artifact(model, "vp", 4, P=3, head=verbalizer([11, 12])),
        artifact(model, "ptv2", 5, biases=False, P=6, head=linear(hidden, 5)),
        artifact(model, "soft", 6, biases=False, soft=2, head=verbalizer([60, 61, 62])),
    ]
    torch.manual_seed(1)
    inputs = [torch.randint(3, 120, (n,)).tolist() + [MASK_ID] for n in (6, 3, 8, 4, 5, 7)]
    logits = [reference_classify(model, ids, a) for ids, a in zip(inputs, arts, strict=True)]
    n = len(arts)
    return Case(
        "bert-mlm",
        [a.task for a in arts],
        {a.task: a for a in arts},
        inputs,
        [False] * n,
        [[]] * n,
        logits,
        tokenizer=tiny_tokenizer(mask=True),
    )


def test_gpt2_bias_rows_mixed_with_every_method_match_their_reference():
    case = gpt2_case()
    rows = run(case)
    assert_matches(case, rows)


def test_bert_verbalizer_and_linear_bias_rows_match_their_reference():
    case = bert_case()
    rows = run(case)
    assert_matches(case, rows)


def test_control_bias_deltas_move_the_logits():
    """Served without their deltas (the reference of the bare backbone), the bias rows must differ: the comparison
    above can fail."""
    case = gpt2_case()
    bare = [reference_generate(tiny_model("gpt2"), ids, None)[1] for ids in case.inputs]
    rows = run(case)
    control = Case(case.kind, case.tasks, case.artifacts, case.inputs, case.generate, case.ref_tokens, bare)
    diffs = differences(control, rows)
    assert min(diffs[t] for t in ("b1", "b2", "b3", "bp")) > 1e-2, diffs
    assert diffs[None] <= 1e-5


def test_decoder_bias_is_counted_once():
    """cls.predictions.bias and cls.predictions.decoder.bias are one tensor: one delta path, the MLM logits shift
    by the delta exactly once."""
    model = tiny_model("bert-mlm")
    bb = wrap_model(copy.deepcopy(model), tiny_tokenizer(mask=True), name="mlm")
    targets = bias_targets(bb)
    assert "cls.predictions" in targets and not any("decoder" in p for p in targets)
    delta = torch.randn(targets["cls.predictions"].shape)
    shifted = biased_copy(model, {"cls.predictions": delta})
    x = torch.tensor([[5, 6, MASK_ID]])
    with torch.no_grad():
        moved = shifted(input_ids=x).logits - model(input_ids=x).logits
    assert torch.allclose(moved[0, -1], delta, atol=1e-5)


def test_bias_free_backbone_refuses_a_bias_task():
    llama = wrap_model(tiny_model("llama"), None, name="tiny-llama")
    art = PrefixArtifact(
        task="b",
        method="bitfit",
        fingerprint=llama.fingerprint,
        biases={"layers.0.self_attn.q_proj": torch.ones(64)},
    )
    with pytest.raises(BackboneMismatch, match="no bias terms"):
        check_artifact(llama, art)


def test_wrong_module_names_and_sizes_are_refused():
    gpt2 = wrap_model(tiny_model("gpt2"), None, name="tiny-gpt2")
    fp = gpt2.fingerprint
    unknown = PrefixArtifact(task="b", method="bitfit", fingerprint=fp, biases={"h.0.attn.q_proj": torch.ones(64)})
    with pytest.raises(BackboneMismatch, match="does not have"):
        check_artifact(gpt2, unknown)
    wrong = PrefixArtifact(task="b", method="bitfit", fingerprint=fp, biases={"h.0.attn.c_attn": torch.ones(64)})
    with pytest.raises(BackboneMismatch, match=r"expected shape \(192,\)"):
        check_artifact(gpt2, wrong)


# -- checkpoints ----------------------------------------------------------------------------------------------------
def tuned_checkpoint(model, seed: int) -> dict[str, torch.Tensor]:
    """A BitFit fine-tune of `model`: every bias moved, every other weight as it was; LayerNorm biases under the old
    name `beta`, the tied decoder bias under both of its names."""
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.endswith("bias"):
                p += 0.1 * torch.randn(p.shape, generator=g)
    sd = {k: v.clone() for k, v in tuned.state_dict().items()}
    return {(k[: -len("bias")] + "beta" if "LayerNorm.bias" in k else k): v for k, v in sd.items()}


def import_from(bb, sd: dict[str, torch.Tensor], **kw) -> PrefixArtifact:
    base, weights = checkpoint_references(bb)
    return import_bias_checkpoint(
        sd, sd.__getitem__, task="ft", backbone=bb.fingerprint, base=base, base_weights=weights, **kw
    )


def test_checkpoint_import_and_export_round_trip():
    model = tiny_model("bert-mlm")
    bb = wrap_model(copy.deepcopy(model), tiny_tokenizer(mask=True), name="mlm")
    sd = tuned_checkpoint(model, 7)
    art = import_from(bb, sd, labels=["a", "b"], verbalizer=[10, 11], template="{text} [MASK]")
    check_artifact(bb, art)
    assert set(art.biases) == set(bias_targets(bb)), "every bias moved, each counted once"
    exported = export_bias_state_dict(art, bias_targets(bb), base_prefix="bert.")
    fresh = copy.deepcopy(model)
    missing, unexpected = fresh.load_state_dict(exported, strict=False)
    assert not unexpected
    for name, p in fresh.named_parameters():
        if name.endswith("bias"):
            want = sd[name[: -len("bias")] + "beta"] if "LayerNorm.bias" in name else sd[name]
            assert torch.allclose(p, want, atol=1e-6), name


def test_checkpoint_that_changed_weights_is_refused():
    model = tiny_model("bert-mlm")
    bb = wrap_model(copy.deepcopy(model), None, name="mlm")
    sd = tuned_checkpoint(model, 8)
    sd["bert.encoder.layer.1.output.dense.weight"] = sd["bert.encoder.layer.1.output.dense.weight"] + 0.01
    with pytest.raises(UnsupportedAdapter, match="changed weights other than biases"):
        import_from(bb, sd)


def test_a_masked_lm_checkpoint_loads_with_its_head_and_no_random_pooler(tmp_path):
    """load_backbone on a *ForMaskedLM directory: the encoder without a pooler (its weights are not in the
    checkpoint) and the masked-LM head, whose scores at [MASK] are the checkpoint's own."""
    from service.runtime import load_backbone

    model = tiny_model("bert-mlm")
    model.save_pretrained(tmp_path)
    tiny_tokenizer(mask=True).save_pretrained(tmp_path)
    bb = load_backbone(str(tmp_path), device="cpu")
    assert bb.mlm is not None and bb.mlm.transform is not None and "pooler" not in bb.poolings
    x = torch.tensor([[5, 9, MASK_ID]])
    with torch.no_grad():
        want = model(input_ids=x).logits[0, -1, [10, 20]]
        h = bb.body(input_ids=x).last_hidden_state[0, -1]
        got = bb.mlm.transform(h) @ bb.mlm.weight[[10, 20]].T + bb.mlm.bias[[10, 20]]
    assert torch.allclose(got, want, atol=1e-5)
