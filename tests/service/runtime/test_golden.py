"""The engine against recorded references (tests/golden/data, written by `python -m tests.golden.record` from PEFT
under the locked versions): the same mixed batches as the equivalence tests, with no PEFT at run time, so the
engine's correctness is checked on any transformers release, including one that PEFT does not support yet. The
engine is driven directly (no Redis); test_equivalence serves a case through the store and the scheduler."""

import pytest

from tests.golden.cases import CASES, assert_matches, load, run


@pytest.mark.parametrize("name", CASES)
def test_engine_matches_recorded_peft_outputs(name):
    case = load(name)
    assert_matches(case, run(case))
