"""Every row of a mixed-task batch equals its adapter run alone through PEFT (fp32, |dlogit| <= 1e-5, same greedy
tokens), with rows joining while others are mid-decode. The adapters travel the real path of an upload (PEFT
save_pretrained -> import -> the store's codec); the cases live in tests/golden/cases.py, shared with the
golden-output tests. The engine is driven directly (no Redis), except in the end-to-end test at the bottom, which
serves a case through Redis, the host cache and the scheduler."""

import pytest

from service.runtime import EngineRequest, SamplingParams
from service.runtime import runner as runner_module
from tests.engine_harness import engine_for, generate, stored
from tests.golden.cases import (
    LABELS,
    assert_matches,
    backbone_of,
    bert_case,
    causal_classification_case,
    differences,
    generation_case,
    run,
    serve,
)


def _check_mid_decode_join(rows) -> None:
    first_group_last_step = max(ev.step for row in rows[:3] for ev in row)
    second_group_first_step = min(ev.step for row in rows[3:] for ev in row)
    assert second_group_first_step < first_group_last_step, "rows must join while others are mid-decode"


@pytest.mark.peft_reference("generate")
@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_mixed_generation_matches_peft_alone(kind, tmp_path):
    case = generation_case(kind, tmp_path)
    rows = run(case)
    _check_mid_decode_join(rows)
    assert_matches(case, rows)


@pytest.mark.peft_reference("generate")
def test_negative_control_wrong_positions_fail(tmp_path, monkeypatch):
    """With the +P offset dropped (tokens at 0..n-1, the model default), the same comparison must fail."""
    case = generation_case("llama", tmp_path)
    right = runner_module.token_positions
    monkeypatch.setattr(
        runner_module,
        "token_positions",
        lambda starts, lengths, T, device: right([0] * len(starts), lengths, T, device),
    )
    diffs = differences(case, run(case))
    assert diffs["prefix"] > 1e-3 and diffs["ptv2"] > 1e-3, diffs
    assert diffs[None] <= 1e-5  # the bare backbone has no prefix, so its positions were right all along


@pytest.mark.peft_reference("seq_cls")
def test_causal_lm_classification_rides_with_generation(tmp_path):
    """A SEQ_CLS adapter served on the causal LM backbone, in the same prefill as a generation row."""
    case = causal_classification_case(tmp_path)
    rows = run(case)
    assert rows[0][0].step == rows[1][0].step, "the classification row rode in the generation row's prefill"
    assert_matches(case, rows)


@pytest.mark.peft_reference("seq_cls")
def test_bert_mixed_classification_matches_peft(tmp_path):
    case = bert_case(tmp_path)
    rows = run(case)
    assert len({evs[0].step for evs in rows}) == 1, "all four tasks ran in one forward"
    assert_matches(case, rows)
    for (ev,), ref in zip(rows, case.ref_logits):
        assert LABELS[max(range(3), key=ev.probs.__getitem__)] == LABELS[int(ref.argmax())]
        assert abs(sum(ev.probs) - 1) < 1e-5


def test_seeded_sampling_is_independent_of_the_batch(tmp_path):
    case = generation_case("llama", tmp_path)
    arts = {t: stored(a) for t, a in case.artifacts.items()}
    prompt = case.inputs[1]
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=30, top_p=0.95, seed=1234, ignore_eos=True)
    engine = engine_for(backbone_of("llama"), max_rows=8)
    (alone,) = generate(engine, [EngineRequest.generate("alone", prompt, arts["ptv2"], params)])
    others = [
        EngineRequest.generate(f"o{i}", p, arts.get(t), SamplingParams(max_new_tokens=8, temperature=1.0, seed=i))
        for i, (t, p) in enumerate(zip(case.tasks, case.inputs))
    ]
    results = generate(engine, [EngineRequest.generate("mixed", prompt, arts["ptv2"], params), *others])
    another = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=30, top_p=0.95, seed=99, ignore_eos=True)
    (another_seed,) = generate(engine, [EngineRequest.generate("another", prompt, arts["ptv2"], another)])
    assert results[0].token_ids == alone.token_ids
    assert another_seed.token_ids != alone.token_ids


# -- end to end: the same comparison through Redis, the host cache and the scheduler ---------------------------------
@pytest.mark.redis
@pytest.mark.peft_reference("generate")
async def test_mixed_generation_through_the_store_and_scheduler_matches_peft_alone(store, tmp_path):
    """The artifacts published to Redis, read back through the host cache, the rows admitted by the scheduler as
    they arrive (joining mid-decode): every row still equals PEFT alone."""
    case = generation_case("llama", tmp_path)
    rows = await serve(store, case)
    _check_mid_decode_join(rows)
    assert_matches(case, rows)
