"""The family matrix: every supported backbone family, with its attention features switched on (sliding windows
shorter than the rows, soft-caps that bite, attention sinks, final logit scaling), serves rows of the bare backbone, a
Prefix-Tuning task, a P-Tuning v2 task, a soft-prompt task and (where the family has biases) a bias task mixed in one
batch, each equal to its task run alone through PEFT or transformers (fp32, max |dlogit| <= 1e-5 at every step, the
same greedy tokens, log-probabilities and prompt log-probabilities within 1e-4). The rows join mid-decode, long
prompts are prefilled in chunks (so sliding layers attend to their ring across chunks), and one row forks another's
prefill (its ring is copied). Each feature has a negative control that must fail when the feature is dropped; the
guards that keep an unproven family from being served wrong are tested here too.

The engine is driven directly (Engine.step), without Redis, as by the golden tests (the same cases against recorded
references); test_equivalence serves a case end to end, through Redis and the scheduler.
"""

from __future__ import annotations

import copy

import pytest
from transformers import BloomConfig, BloomForCausalLM, FalconConfig, FalconForCausalLM, GPTJConfig, GPTJForCausalLM

from service.runtime import Engine, EngineRequest, SamplingParams, StepPlan, families, wrap_model
from service.runtime import attention as attention_module
from service.runtime.attention import AttentionBypassed, Features
from service.runtime.families import UnsupportedBackbone
from tests.families import ENCODERS, FAMILIES, WINDOW
from tests.family_matrix import CHUNK, causal_differences, encoder_differences, run_causal
from tests.golden.cases import STEPS, Case, backbone_of, encoder_case, family_case
from tests.references import reference_generate

pytestmark = pytest.mark.peft_reference("generate")

_cases: dict[str, Case] = {}


def case_of(name: str, tmp_path_factory) -> Case:
    """The family's case, built once per session (PEFT references are the slow part)."""
    if name not in _cases:
        build = encoder_case if name in ENCODERS else family_case
        _cases[name] = build(name, tmp_path_factory.mktemp(name))
        for art in _cases[name].artifacts.values():
            art.version = 1
    return _cases[name]


@pytest.mark.parametrize("chunk", [CHUNK, 4096], ids=["chunked", "whole"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_rows_mixed_in_one_batch_match_their_references(name, chunk, tmp_path_factory):
    """Chunked: long prompts take two steps (sliding layers read their ring across chunks); whole: the joining rows
    prefill together in one forward."""
    case = case_of(name, tmp_path_factory)
    model = backbone_of(case.kind)
    got = run_causal(case, copy.deepcopy(model), chunk)
    assert set(got) == {f"r{i}" for i in range(len(case.tasks))} | {"fork"}
    diffs = causal_differences(case, got, model)
    assert max(diffs.values()) <= 1e-5, f"{name}: max |dlogit| (|dlogprob|) per row {diffs}"
    if "window" in FAMILIES[name].features:
        longest = max(len(ids) + (a.num_virtual_tokens if a else 0) for ids, a in zip(case.inputs, _arts(case)))
        assert longest + STEPS > 2 * WINDOW, "the rows outgrow the window"


def _arts(case: Case) -> list:
    return [case.artifacts.get(t) if t else None for t in case.tasks]


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoder_family_rows_mixed_in_one_forward_match_their_references(name, tmp_path_factory):
    """Every task row with its head, and the bare backbone's embedding, in one forward."""
    case = case_of(name, tmp_path_factory)
    diffs = encoder_differences(case, backbone_of(case.kind))
    assert max(diffs.values()) <= 1e-5, f"{name}: max |dlogit| per row {diffs}"


# -- negative controls: each feature, dropped, must make the comparison fail ------------------------------------------
def _drop(feature: str):
    def call_features(module, attention_mask, kwargs):
        f = _honest(module, attention_mask, kwargs)
        return Features(
            None if feature == "window" else f.window,
            None if feature == "softcap" else f.softcap,
            None if feature == "sinks" else f.sinks,
        )

    return call_features


_honest = attention_module.call_features


@pytest.mark.parametrize(
    "name, feature",
    [
        ("mistral", "window"),
        ("gemma3", "window"),
        ("qwen2-window", "window"),
        ("gemma2", "softcap"),
        ("gpt_oss", "sinks"),
        ("gemma2", "final_softcap"),
        ("cohere", "logit_scale"),
    ],
)
def test_negative_control_a_dropped_feature_fails_the_comparison(name, feature, tmp_path_factory, monkeypatch):
    case = case_of(name, tmp_path_factory)
    model = backbone_of(case.kind)
    if feature in ("window", "softcap", "sinks"):
        monkeypatch.setattr(attention_module, "call_features", _drop(feature))
        if feature == "window":  # every layer keeps every token, and attends to all of them
            monkeypatch.setattr(families, "attention_windows", lambda config: (None,) * config.num_hidden_layers)
    else:  # the LM head's output served as it comes (and the load-time check that would refuse it, off)
        monkeypatch.setattr(families, "final_logits", lambda config: None)
        monkeypatch.setattr(families, "check_output_head", lambda model, head: None)
    diffs = causal_differences(case, run_causal(case, copy.deepcopy(model)), model)
    assert max(diffs.values()) > 1e-3, f"{name} without {feature} still matched: {diffs}"


def test_negative_control_positions_without_the_roberta_offset_fail(tmp_path_factory, monkeypatch):
    case = case_of("roberta", tmp_path_factory)
    monkeypatch.setattr(families, "position_offset", lambda config: 0)
    bb = wrap_model(backbone_of("encoder-roberta"), None, name="roberta")
    rows = (
        Engine(bb)
        .step(
            StepPlan(
                tuple(
                    EngineRequest.classify(f"r{i}", ids, case.artifacts[t])
                    for i, (t, ids) in enumerate(zip(case.tasks, case.inputs))
                )
            )
        )
        .rows
    )
    worst = max((o.logits - case.ref_logits[i]).abs().max().item() for i, o in enumerate(rows))
    assert worst > 1e-3


# -- guards: an unproven family is refused; a bypassed attention fails loudly ------------------------------------------
@pytest.mark.parametrize(
    "model, reason",
    [
        (lambda: BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=64)), "BloomAttention"),
        (
            lambda: FalconForCausalLM(
                FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
            ),
            "FalconAttention",
        ),
        (
            lambda: GPTJForCausalLM(GPTJConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=64, rotary_dim=4)),
            "not a family the engine has been proven on",
        ),
    ],
)
def test_an_unproven_family_is_refused_with_the_supported_list(model, reason):
    with pytest.raises(UnsupportedBackbone, match=reason) as e:
        wrap_model(model(), None, name="x")
    assert "llama" in str(e.value) and "gemma2" in str(e.value), "the message lists the supported families"


def test_an_unproven_causal_lm_loads_only_when_allowed_and_says_so():
    gptj = GPTJForCausalLM(GPTJConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=64, rotary_dim=4)).eval()
    with pytest.raises(UnsupportedBackbone, match="ALLOW_UNVERIFIED_BACKBONE"):
        wrap_model(copy.deepcopy(gptj), None, name="gptj")
    bb = wrap_model(gptj, None, name="gptj", allow_unverified=True)
    assert bb.describe()["verified"] is False and "UNVERIFIED" in bb.describe()["unverified_warning"]
    with pytest.raises(UnsupportedBackbone):  # a family known not to work is refused even then
        wrap_model(
            BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=64)),
            None,
            name="b",
            allow_unverified=True,
        )


@pytest.mark.parametrize("allow", [False, True])
def test_a_config_feature_the_engine_does_not_serve_is_refused_even_when_unverified_is_allowed(allow):
    model = FAMILIES["gemma3"].builder()
    model.config.use_bidirectional_attention = True  # EmbeddingGemma
    with pytest.raises(UnsupportedBackbone, match="use_bidirectional_attention"):
        wrap_model(model, None, name="g", allow_unverified=allow)


def test_a_causal_encoder_is_refused():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, is_decoder=True))
    with pytest.raises(UnsupportedBackbone, match="is_decoder"):
        wrap_model(model, None, name="b", allow_unverified=True)


@pytest.mark.parametrize("name", ["llama", "cohere", "olmo2"])
def test_a_sliding_window_key_on_a_family_that_does_not_slide_is_ignored_as_its_modules_ignore_it(name):
    """Converted checkpoints carry `sliding_window` on families whose modules never read it: served as transformers
    runs them (every token attended), not refused and not failing at the first request."""
    from tests.families import family_model

    model = family_model(name)
    model.config.sliding_window = 4
    bb = wrap_model(copy.deepcopy(model), None, name=name)
    assert bb.windows == (None,) * model.config.num_hidden_layers
    ids = list(range(5, 25))
    engine = Engine(bb, max_rows=2)
    p = SamplingParams(max_new_tokens=3, return_logits=True, ignore_eos=True)
    outs = list(engine.step(StepPlan((EngineRequest.generate("r", ids, None, p),))).rows)
    while engine.running:
        outs += engine.step(StepPlan()).rows
    # The model's own forward, with a cache built without the config (as PEFT's is): every token attended.
    # (transformers' generate would build its cache from the config and drop tokens past the window, unlike the
    # model's forward: the key means nothing to these families' attention.)
    _, ref = reference_generate(model, ids, None, steps=3)
    assert max((o.logits - ref[k]).abs().max().item() for k, o in enumerate(outs)) <= 1e-5


def test_a_head_the_engine_does_not_reproduce_is_refused(monkeypatch):
    monkeypatch.setattr(families, "final_logits", lambda config: None)  # Cohere's logit_scale forgotten
    with pytest.raises(UnsupportedBackbone, match="LM head's logits differ"):
        wrap_model(FAMILIES["cohere"].builder().eval(), None, name="c")


def _generate_one(bb) -> list:
    engine = Engine(bb, max_rows=2)
    req = EngineRequest.generate("r", [5, 6, 7, 8], None, SamplingParams(max_new_tokens=2))
    return engine.step(StepPlan((req,))).rows


def test_a_layer_that_skips_the_engines_attention_fails_loudly():
    """A layer whose attention does not reach the engine (as StableLM's would through keyword arguments) is caught
    by the once-per-layer check, not served with a cache-less attention."""
    model = FAMILIES["llama"].builder().eval()
    attn = model.model.layers[1].self_attn
    sdpa = attention_module.F.scaled_dot_product_attention

    def bypass(hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        B, T, _ = hidden_states.shape
        q = attn.q_proj(hidden_states).view(B, T, -1, attn.head_dim).transpose(1, 2)
        return attn.o_proj(sdpa(q, q, q).transpose(1, 2).reshape(B, T, -1)), None

    attn.forward = bypass
    with pytest.raises(AttentionBypassed, match=r"ran \{1: 0\} times"):
        _generate_one(wrap_model(model, None, name="llama"))


def test_an_attention_argument_the_engine_does_not_implement_is_refused(monkeypatch):
    """A module that asks for something new (here a made-up `attention_chunk`) fails the forward."""
    model = FAMILIES["llama"].builder().eval()
    attn = model.model.layers[0].self_attn
    real = attention_module.prefix_serve_attention

    def with_extra(module, q, k, v, mask, **kw):
        return real(module, q, k, v, mask, **({"attention_chunk": 8} if module is attn else {}), **kw)

    monkeypatch.setitem(attention_module.AttentionInterface._global_mapping, attention_module.ATTN_NAME, with_extra)
    with pytest.raises(AttentionBypassed, match="attention_chunk"):
        _generate_one(wrap_model(model, None, name="llama"))


def test_sliding_layers_hold_only_their_window():
    """A 3-layer model whose layers 0 and 2 slide over WINDOW tokens: those layers' rings hold WINDOW positions per
    slot however long the rows grow; the full layer grows with them."""
    bb = wrap_model(backbone_of("family-gemma3"), None, name="gemma3")
    engine = Engine(bb, max_rows=2)
    req = EngineRequest.generate("r", list(range(5, 45)), None, SamplingParams(max_new_tokens=4, ignore_eos=True))
    engine.step(StepPlan((req,)))
    cache = engine.cache
    assert cache.windows == (WINDOW, None, WINDOW)
    assert cache.rings[WINDOW].k.shape[0] == 2 and cache.rings[WINDOW].capacity == WINDOW
    assert cache.k[0].shape[0] == 1 and cache.width >= 44
    ring_bytes = cache.rings[WINDOW].nbytes
    assert ring_bytes * cache.width < cache.nbytes * WINDOW * 2, "the two sliding layers cost a window, not the width"


def test_the_readme_table_is_the_matrix():
    """README.md's supported-backbone table lists exactly the matrix's entries and families.py's features and
    refusals (regenerate it with `python -m tests.family_matrix --write`)."""
    from tests.family_matrix import README, readme_table, render, without_measured

    assert without_measured(readme_table(README.read_text())) == without_measured(render())
