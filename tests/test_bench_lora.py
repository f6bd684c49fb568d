"""bench/lora_paths.py runs end to end at tiny sizes (the measurement behind GROUPED_MIN_ROWS_PER_TASK cannot rot)."""

from bench import lora_paths
from service.runtime import low_rank


def test_lora_paths_benchmark_smoke(capsys):
    before = low_rank.GROUPED_MIN_ROWS_PER_TASK
    report = lora_paths.main("--hidden 64 --layers 1 --rows 4 --prefill-tokens 3 --rank 2 --repeats 1".split())
    assert set(report) == {(shape, n) for shape in ("decode", "prefill") for n in (1, 2, 4)}
    assert all(ms > 0 for row in report.values() for ms in row)
    assert low_rank.GROUPED_MIN_ROWS_PER_TASK == before  # the benchmark leaves the setting as it found it
    assert "gathered" in capsys.readouterr().out
