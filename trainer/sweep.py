"""Sweeps: one job's data trained over a grid of methods, learning rates and prompt lengths, each run evaluated on
the dev set through the serving engine, the best kept for publishing.

Each run trains in its own directory under the sweep's work directory, with its own checkpoints, and a finished
run's result is written to `sweep.json` there: a sweep that is stopped and started again skips the finished runs and
resumes the interrupted one from its checkpoint. With `parallel` > 1, runs train in that many processes at once,
the machine's cores split between them.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from prefix_store import PrefixArtifact, decode
from prefix_store.jobs import TrainSpec
from service.runtime import Backbone, load_backbone

from .methods import with_method_defaults
from .train import Progress, TrainResult, train

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]  # one per run: its settings, dev metrics, steps, seconds, degenerate
    best: int | None  # the best run that is not degenerate (any run when every one is and publish_degenerate is set)
    artifact: PrefixArtifact | None  # the best run's artifact (its best evaluation)
    metric: str
    table: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def result(self) -> dict[str, Any] | None:
        return None if self.best is None else self.rows[self.best]


def configs(spec: TrainSpec) -> list[TrainSpec]:
    """Every run of the grid, each with a stable name (run-00, run-01, ...) kept in its task's training metadata."""
    grid = spec.sweep
    assert grid is not None
    methods = grid.methods or [spec.method]
    lrs = grid.lrs or [spec.lr]
    lengths = grid.num_virtual_tokens or [spec.num_virtual_tokens]
    runs = []
    for method, lr, P in itertools.product(methods, lrs, lengths):
        run = spec.model_copy(update={"method": method, "lr": lr, "num_virtual_tokens": P, "sweep": None})
        runs.append(with_method_defaults(run))
    return runs


def run_sweep(
    backbone: Backbone | None,
    spec: TrainSpec,
    work_dir: Path,
    progress: Progress | None = None,
    loader: dict[str, Any] | None = None,
) -> SweepResult:
    """Trains every run of the grid (skipping those `sweep.json` says are done) and picks the best.

    Args:
        backbone: the frozen backbone, for runs trained in this process.
        loader: how to load the backbone in another process (load_backbone's arguments), for parallel runs.
    """
    runs = configs(spec)
    work_dir.mkdir(parents=True, exist_ok=True)
    state_path = work_dir / "sweep.json"
    done: dict[str, dict[str, Any]] = json.loads(state_path.read_text()) if state_path.exists() else {}
    todo = [(i, r) for i, r in enumerate(runs) if _name(i) not in done]
    report = progress or (lambda info: None)
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=f"sweep {spec.task}", disable=None)

    def finish(i: int, row: dict[str, Any]) -> None:
        done[_name(i)] = row
        state_path.write_text(json.dumps(done, indent=1))  # the record of finished runs, for resuming
        bar.update(1)
        report({"run": len(done), "runs": len(runs), "last": row})

    parallel = spec.sweep.parallel if spec.sweep else 1
    if parallel > 1 and len(todo) > 1:
        assert loader is not None, "parallel runs load the backbone in their own processes"
        threads = max(1, (os.cpu_count() or 1) // parallel)
        ctx = get_context("spawn")
        with ProcessPoolExecutor(
            parallel, mp_context=ctx, initializer=_init_worker, initargs=(loader, threads)
        ) as pool:
            futures = {pool.submit(_train_in_worker, r, str(work_dir / _name(i))): i for i, r in todo}
            for future in as_completed(futures):
                finish(futures[future], future.result())
    else:
        assert backbone is not None
        for i, run in todo:
            report({"run": len(done) + 1, "runs": len(runs), "settings": _settings(run)})

            def inner(info: dict[str, Any], i: int = i) -> None:
                report({"run": i + 1, "runs": len(runs), **info})

            finish(i, _row(run, train(backbone, run, work_dir / _name(i), inner)))
    bar.close()
    rows = [done[_name(i)] for i in range(len(runs))]
    metric = rows[0]["metric"]
    learned = [i for i, r in enumerate(rows) if not r.get("degenerate")]
    if not learned and spec.publish_degenerate:
        learned = list(range(len(rows)))
    scored = [(rows[i]["metrics"].get(metric, -math.inf), i) for i in learned]
    best = max(scored, key=lambda t: (t[0], -t[1]))[1] if scored else None  # ties go to the earlier run
    artifact = None
    if best is not None:
        artifact = decode((work_dir / _name(best) / "best.safetensors").read_bytes())
        artifact.training["sweep"] = {"runs": len(rows), "chosen": _name(best)}
    return SweepResult(rows, best, artifact, metric, table(rows, metric, best))


def table(rows: list[dict[str, Any]], metric: str, best: int | None) -> str:
    lines = [
        f"| run | method | P | lr | dev {metric} | steps | trainable | seconds | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, r in enumerate(rows):
        note = "best" if i == best else ("degenerate" if r.get("degenerate") else "")
        value = r["metrics"].get(metric, float("nan"))
        lines.append(
            f"| {_name(i)} | {r['method']} | {r['num_virtual_tokens']} | {r['lr']:g} | {value:.4f} | {r['steps']} | "
            f"{r['trainable']:,} | {r['seconds']:.0f} | {note} |"
        )
    return "\n".join(lines)


def _name(i: int) -> str:
    return f"run-{i:02d}"


def _settings(run: TrainSpec) -> dict[str, Any]:
    return {"method": run.method, "lr": run.lr, "num_virtual_tokens": run.num_virtual_tokens}


def _row(run: TrainSpec, result: TrainResult) -> dict[str, Any]:
    return {
        **_settings(run),
        "metric": result.artifact.training.get("metric", "accuracy"),
        "metrics": result.metrics,
        "steps": result.steps,
        "seconds": result.artifact.training.get("train_seconds", 0.0),
        "degenerate": result.degenerate,
        "trainable": served_parameters(result.artifact),
    }


def served_parameters(artifact: PrefixArtifact) -> int:
    """The parameters a task serves: its prefix (key/values or soft prompt, as exported), bias deltas and head."""
    return sum(t.numel() for t in artifact.tensors())


# -- parallel runs (one process each, spawned) ---------------------------------------------------------------------
_WORKER_BACKBONE: Backbone | None = None


def _init_worker(loader: dict[str, Any], threads: int) -> None:
    global _WORKER_BACKBONE
    torch.set_num_threads(threads)
    _WORKER_BACKBONE = load_backbone(**loader)


def _train_in_worker(run: TrainSpec, work_dir: str) -> dict[str, Any]:
    assert _WORKER_BACKBONE is not None
    return _row(run, train(_WORKER_BACKBONE, run, work_dir))
