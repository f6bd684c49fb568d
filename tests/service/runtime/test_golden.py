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
