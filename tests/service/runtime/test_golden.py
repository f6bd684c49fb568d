"""The engine against recorded references (tests/golden/data, written by `python -m tests.golden.record` from PEFT
under the locked versions): the same mixed batches as the equivalence tests, with no PEFT at run time, so the
engine's correctness is checked on any transformers release, including one that PEFT does not support yet. The
engine is driven directly (no Redis); test_equivalence serves a case through the store and the scheduler."""

import pytest

from service.runtime import attention
from tests.golden.cases import CASES, assert_matches, load, run


@pytest.mark.parametrize("name", CASES)
def test_engine_matches_recorded_peft_outputs(name):
    case = load(name)
    assert_matches(case, run(case))


@pytest.mark.parametrize("cascade", [True, False], ids=["grouped", "per-row"])
@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("encoder")])
def test_decode_grouped_by_task_or_per_row_matches_the_references(name, cascade, monkeypatch):
    """Decode's prefix attention forced grouped by task (each prefix read once per layer) or per row, on every
    causal case (mixed tasks, sliding windows, soft-caps, sinks, rows joining mid-decode): both equal PEFT."""
    monkeypatch.setattr(attention, "CASCADE", cascade)
    case = load(name)
    assert_matches(case, run(case))


def test_control_grouped_rows_taking_another_groups_prefix_fail(monkeypatch):
    """The grouped path is really taken: rows handed the next group's prefix results no longer match."""
    rows = attention.TaskGroups.rows

    def shifted(self, y):
        out = rows(self, y)
        return out.roll(1, 0) if out.shape[0] > 1 else out

    monkeypatch.setattr(attention, "CASCADE", True)
    monkeypatch.setattr(attention.TaskGroups, "rows", shifted)
    case = load("llama")
    with pytest.raises(AssertionError):
        assert_matches(case, run(case))


def test_decode_grouped_equals_per_row_when_rows_share_tasks(monkeypatch):
    """Eight rows over two tasks and a bare row, through the engine: every decode step's logits and every token are
    the same grouped by task as per row (the golden cases above have one row per task)."""
    import copy

    import torch

    from prefix_store import BackboneFingerprint
    from service.runtime import EngineRequest, SamplingParams
    from tests.engine_harness import engine_for, run_engine, stored
    from tests.factories import make_artifact
    from tests.models import tiny_model

    base = tiny_model("llama")
    fp = BackboneFingerprint.from_config(base.config)
    arts = [stored(make_artifact(f"t{i}", "p_tuning_v2", P=6 + i, seed=i, fp=fp)) for i in range(2)]
    torch.manual_seed(0)
    prompts = [torch.randint(3, 120, (n,)).tolist() for n in (3, 7, 5, 9, 4, 6, 8, 2, 5)]
    params = SamplingParams(max_new_tokens=5, ignore_eos=True, return_logits=True)
    owners = [arts[0], arts[1], arts[0], arts[0], arts[1], None, arts[1], arts[0], arts[1]]
    runs = {}
    for cascade in (True, False):
        monkeypatch.setattr(attention, "CASCADE", cascade)
        reqs = [EngineRequest.generate(f"r{i}", p, a, params) for i, (p, a) in enumerate(zip(prompts, owners))]
        runs[cascade] = run_engine(engine_for(copy.deepcopy(base)), reqs)
    for rid, outs in runs[True].items():
        assert [o.token_id for o in outs] == [o.token_id for o in runs[False][rid]]
        for a, b in zip(outs, runs[False][rid]):
            assert (a.logits - b.logits).abs().max().item() <= 1e-5
