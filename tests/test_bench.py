"""bench/engine.py runs end to end (tiny sizes, every scenario): the benchmark cannot rot unnoticed."""

import asyncio
import json
from pathlib import Path

import pytest

from bench import engine as bench


@pytest.mark.slow
def test_engine_benchmark_smoke(tmp_path, capsys):
    args = bench.parse_args(
        "--requests 4 --prompt 4 --new 3 --prefix 4 --layers 1 --hidden 32 --heads 2 --vocab 64 --repeats 1 "
        f"--max-batch 4 --hosted 1 3 --prefix-lengths 4 8 --churn-tasks 6 --peft-tasks 2 --peft-prompt 4 "
        f"--peft-new 3 --peft-max-batch 4 --chunk 16 --compile-batches 1 --plots {tmp_path}".split()
    )
    report = asyncio.run(bench.main(args))
    assert set(bench.SCENARIOS) <= set(report)
    assert all(tok > 0 and ratio > 0 for _, tok, ratio in report["hosted"])
    ours, theirs, achieved, peak = report["peft"]
    assert ours > 0 and theirs > 0 and 0 < achieved < peak
    assert all(held >= ideal > 0 for _, held, ideal, _, _ in report["memory"])
    assert report["bias"][0] > 0 and report["bias"][1] > 0
    assert all(ratio > 0 and per_row >= grouped > 0 for _, _, ratio, per_row, grouped in report["cascade"])
    step, needed, achieved, gbps, _, _ = report["roofline"]
    assert step > 0 and needed > 0 and achieved > 0 and gbps > 0
    assert all(x > 0 for x in report["first"])
    assert report["compile"]["warm_s"] > 0 and all(e > 0 and c > 0 for _, e, c in report["compile"]["steps"])
    tok_bare, tok_lora, tax, tok_prefix, tok_mixed, mixed_ratio, _, _, peak = report["lora"]
    assert min(tok_bare, tok_lora, tok_prefix, tok_mixed, mixed_ratio, peak) > 0 and tax < 1
    assert (tmp_path / "engine.png").exists() and (tmp_path / "stall.png").exists()
    assert "achieved FLOP/s / fp32 GEMM peak" in capsys.readouterr().out


@pytest.mark.slow
def test_lora_scenario_on_llama_adapts_q_and_v(tmp_path, capsys):
    """The LoRA tax on a Llama-shaped backbone (GPT-2's fused c_attn in the test above): tasks on q_proj and v_proj,
    through the same engine."""
    args = bench.parse_args(
        "--only lora --arch llama --requests 4 --prompt 4 --new 3 --prefix 4 --layers 1 --hidden 32 --heads 2 "
        f"--vocab 64 --repeats 1 --max-batch 4 --lora-rank 2 --plots {tmp_path}".split()
    )
    b = bench.Bench(args)
    assert sorted(bench.lora_targets(b.backbone)) == ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj"]
    asyncio.run(b.close())
    report = asyncio.run(bench.main(args))
    assert set(report) == {"lora"} and report["lora"][1] > 0
    assert "LoRA tax: 1 - 64 LoRA tasks (rank 2) / bare backbone" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(
    not (Path(__file__).resolve().parents[2] / "shared" / "data" / "mrpc").is_dir(),
    reason="shared/data is not beside the checkout",
)
def test_quality_protocol_smoke(tmp_path, capsys):
    """bench/quality.py's protocol end to end on a few MRPC examples with the real MiniLM: fine-tuning first, a grid
    chosen on validation, both budgets (the time budget is fine-tuning's wall-clock), resumed without retraining,
    and the table and plot rebuilt from the JSON alone."""
    from bench import quality

    argv = f"--smoke --datasets mrpc --methods p_tuning_v2 finetune --seeds 0 --out {tmp_path}".split()
    quality.main(quality.parse_args(argv))
    path = tmp_path / "quality-mrpc.json"
    results = json.loads(path.read_text())
    assert set(results["runs"]) == {"finetune/steps/0", "p_tuning_v2/steps/0", "p_tuning_v2/time/0"}
    assert len(results["selection"]) == 1 and results["n_val"] > 0
    ft, timed = results["runs"]["finetune/steps/0"], results["runs"]["p_tuning_v2/time/0"]
    assert ft["steps"] <= 2 and timed["stop"]["reason"] in ("max_time", "patience", "converged")
    assert all(0 <= r["dev"] <= 1 and r["trainable"] > 0 for r in results["runs"].values())
    written = path.stat().st_mtime_ns
    quality.main(quality.parse_args(argv))  # every run recorded: nothing trains again
    assert path.stat().st_mtime_ns == written
    capsys.readouterr()
    quality.main(quality.parse_args([*argv, "--report"]))
    out = capsys.readouterr().out
    assert "| P-Tuning v2 | steps |" in out and "| full fine-tuning | equal steps" in out
    assert "selection grid full" in out  # the table says which grid chose the configurations
    assert (tmp_path / "quality-time.png").exists()
