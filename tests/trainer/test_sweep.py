"""Sweeps (a grid of runs, the best published, resumable, from the CLI) and the guard against runs that learned
nothing, on tiny backbones over a real Redis."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from prefix_store import TaskNotFound
from prefix_store.jobs import TrainSpec
from service.runtime import wrap_model
from tests.models import tiny_model, tiny_tokenizer
from trainer.settings import TrainerSettings
from trainer.train import JobCancelled
from trainer.worker import JobControls, run_job

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parents[2]
CLS = [{"text": f"w{3 + i % 20} w{5 + i % 7}", "label": "pos" if i % 20 < 10 else "neg"} for i in range(120)]


def _bert():
    return wrap_model(tiny_model("bert-cls").bert, tiny_tokenizer(), name="tiny-bert")


def _spec(**kw) -> TrainSpec:
    base = dict(task="s", method="p_tuning_v2", examples=CLS, steps=12, eval_every=6, batch_size=8, lr=1e-2)
    return TrainSpec(**{**base, **kw})


async def test_sweep_trains_the_grid_publishes_the_best_and_resumes(store, tmp_path):
    settings = TrainerSettings(work_dir=tmp_path / "work")
    spec = _spec(steps=30, eval_every=10, sweep={"lrs": [1e-3, 5e-2], "num_virtual_tokens": [2, 3]})
    result = await run_job(_bert(), store, spec, settings, "job-1")
    runs = result["runs"]
    assert [(r["lr"], r["num_virtual_tokens"]) for r in runs] == [(1e-3, 2), (1e-3, 3), (5e-2, 2), (5e-2, 3)]
    assert all(r["steps"] == 30 and "accuracy" in r["metrics"] and r["trainable"] > 0 for r in runs)
    learned = [i for i in range(4) if not runs[i]["degenerate"]]
    assert learned, runs
    best = max(learned, key=lambda i: runs[i]["metrics"]["accuracy"])
    assert result["best"] == runs[best] and result["published"] and result["version"] == 1
    assert result["table"].count("\n") == 5 and "best" in result["table"].splitlines()[2 + best]
    stored = await store.get("s", 1)
    assert stored.training["sweep"] == {"runs": 4, "chosen": f"run-{best:02d}"}

    # Stopped after three runs: the sweep starts again, trains only the missing run, and chooses as before.
    state = tmp_path / "work" / "job-1" / "sweep.json"
    done = json.loads(state.read_text())
    kept = {name: (tmp_path / "work" / "job-1" / name / "best.safetensors").stat().st_mtime for name in done}
    del done["run-03"]
    state.write_text(json.dumps(done))
    again = await run_job(_bert(), store, spec, settings, "job-1")
    assert [r["metrics"] for r in again["runs"][:3]] == [r["metrics"] for r in runs[:3]]
    for name in ("run-00", "run-01", "run-02"):
        assert (tmp_path / "work" / "job-1" / name / "best.safetensors").stat().st_mtime == kept[name]
    assert again["runs"][3]["metrics"] == runs[3]["metrics"]  # seeded: the retrained run gives the same result


async def test_a_run_that_learns_nothing_is_reported_and_not_published(store, tmp_path):
    settings = TrainerSettings(work_dir=tmp_path / "work")
    noise = [{"text": f"w{3 + i % 20}", "label": ["a", "b"][(i * 7919) % 3 % 2]} for i in range(200)]
    spec = _spec(examples=noise, lr=1e-6, steps=6, eval_every=3)
    result = await run_job(_bert(), store, spec, settings, "job-2")
    assert "majority-class baseline" in result["degenerate"] and not result["published"]
    assert "publish_degenerate" in result["reason"]
    forced = await run_job(_bert(), store, spec.model_copy(update={"publish_degenerate": True}), settings, "job-3")
    assert forced["published"] and forced["version"] == 1
    assert "majority-class baseline" in (await store.get("s", 1)).training["degenerate"]


def test_sweep_from_the_command_line(tmp_path):
    model_dir = tmp_path / "bert"
    tiny_model("bert-cls").bert.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in CLS))
    env = {
        **os.environ,
        "PREFIXSERVE_BACKBONE": str(model_dir),
        "PREFIXSERVE_DATA_DIR": str(Path("/tmp") / f"ps-sweep-{os.getpid()}"),
        "PREFIXSERVE_WORK_DIR": str(tmp_path / "work"),
        "PREFIXSERVE_LOCAL_FILES_ONLY": "true",
    }
    env.pop("PREFIXSERVE_REDIS_URL", None)
    cmd = [sys.executable, "-m", "trainer", "sweep", "--task", "cli", "--method", "p_tuning_v2", "--data", str(data)]
    cmd += ["--steps", "30", "--eval-every", "10", "--batch-size", "8", "--lrs", "0.001", "0.05"]
    cmd += ["--methods", "p_tuning_v2", "prompt_tuning", "--prompt-lengths", "2", "--run-id", "cli-sweep"]
    cmd += ["--publish-degenerate", "true"]  # 11 validation examples: 30 steps cannot clear their sampling noise
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert len(result["runs"]) == 4 and result["published"] and result["version"] == 1
    assert "| run | method | P | lr | dev accuracy |" in out.stderr and "prompt_tuning" in out.stderr
    assert (tmp_path / "work" / "cli-sweep" / "sweep.json").exists()


async def test_a_cancelled_sweep_stops_at_the_next_step_and_publishes_nothing(store, tmp_path):
    """The worker's stop flag (set when the job is cancelled) ends a sweep in its current run: no later run starts,
    nothing is published. Runs in other processes (parallel > 1) share the flag the same way (trainer.sweep)."""
    stop, seen = threading.Event(), []

    def progress(info):
        seen.append(info)
        if info.get("step") == 3:
            stop.set()

    settings = TrainerSettings(work_dir=tmp_path / "work")
    spec = _spec(steps=1000, eval_every=1000, sweep={"lrs": [1e-3, 5e-2]})
    with pytest.raises(JobCancelled):
        await run_job(_bert(), store, spec, settings, "job-4", progress, JobControls(stop=stop))
    assert max(i.get("step", 0) for i in seen) == 3 and {i["run"] for i in seen if "step" in i} == {1}
    with pytest.raises(TaskNotFound):
        await store.get("s")
