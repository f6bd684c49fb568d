"""bench/engine.py runs end to end (tiny sizes): the benchmark cannot rot unnoticed."""

import asyncio

import pytest

from bench import engine as bench


@pytest.mark.slow
def test_engine_benchmark_smoke(capsys):
    args = bench.parse_args(
        [
            "--requests",
            "8",
            "--tasks",
            "1",
            "4",
            "--prompt",
            "4",
            "--new",
            "3",
            "--prefix",
            "2",
            "--layers",
            "1",
            "--hidden",
            "32",
            "--heads",
            "2",
            "--vocab",
            "64",
            "--repeats",
            "1",
            "--max-batch",
            "4",
        ]
    )
    asyncio.run(bench.main(args))
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line.split() for line in lines[-2:]]
    assert [r[0] for r in rows] == ["1", "4"] and all(len(r) == 6 for r in rows)
    assert all(float(x) > 0 for r in rows for x in r[1:])
