"""bench/tenancy.py runs end to end (few requests, tiny sizes): the benchmark cannot rot unnoticed."""

import asyncio

import pytest

from bench import tenancy as bench


@pytest.mark.slow
def test_tenancy_benchmark_smoke(capsys):
    report = asyncio.run(bench.main(bench.parse_args("--requests 60 --concurrency 8".split())))
    fractions = report["split"]["fractions"]
    assert set(fractions) == {1, 2} and abs(sum(fractions.values()) - 1) < 1e-9 and min(fractions.values()) > 0.2
    assert report["split"]["stable"] == 1.0, "the same request ids land on the same versions"
    assert "split 50/50 over 60 unpinned requests" in capsys.readouterr().out


@pytest.mark.slow
def test_priority_benchmark_smoke(capsys):
    args = "--only priority --flood 48 --probes 3 --batch 4 --flood-new 4".split()
    report = asyncio.run(bench.main(bench.parse_args(args)))
    figures = report["priority"]
    assert set(figures) == {"high", "control"} and all(f["loaded_s"] > 0 for f in figures.values())
    assert "under a saturating low flood" in capsys.readouterr().out
