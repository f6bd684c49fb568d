"""Sweeps: one job's data trained over a grid of methods, learning rates, prompt lengths, reparametrisations,
poolings and prefix starts, each run evaluated through the serving engine on its validation split (carved from the
training data, the same for every run of the grid: one seed), the best there kept for publishing. The dev set is
reported for each run, never chosen on.

Each run trains in its own directory under the sweep's work directory, with its own checkpoints, and a finished
run's result is written to `sweep.json` there: a sweep that is stopped and started again skips the finished runs and
resumes the interrupted one from its checkpoint. With `parallel` > 1, runs train in that many processes at once,
the machine's cores split between them. `parallel` is capped at the cores this process may use (its CPU affinity and
its cgroup's CPU quota): each process holds its own copy of the backbone, so 16 processes on a 2-core host cost 16
backbones' memory and run no faster than 2. The effective value is reported in the progress and the result.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
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
from .train import JobCancelled, Progress, StopFlag, TrainResult, train

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]  # one per run: its settings, validation and dev metrics, steps, stop, degenerate
    # the best run by validation metric that is not degenerate (any, when every one is and publish_degenerate is set)
    best: int | None
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
    reparams = grid.reparam or [spec.reparam]
    poolings = grid.pooling or [spec.pooling]
    inits = grid.prefix_init or [spec.prefix_init]
    runs = []
    for method, lr, P, reparam, pooling, init in itertools.product(methods, lrs, lengths, reparams, poolings, inits):
        update = {"method": method, "lr": lr, "num_virtual_tokens": P, "reparam": reparam, "sweep": None}
        run = spec.model_copy(update={**update, "pooling": pooling, "prefix_init": init})
        runs.append(with_method_defaults(run))
    return runs


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (os.sched_getaffinity, where the platform has it, else
    the machine's count), lowered to a cgroup v2 CPU quota when one is set (a container's --cpus)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def run_sweep(
    backbone: Backbone | None,
    spec: TrainSpec,
    work_dir: Path,
    progress: Progress | None = None,
    loader: dict[str, Any] | None = None,
    *,
    data_dirs: list[str] | None = None,
    stop: StopFlag | None = None,
) -> SweepResult:
    """Trains every run of the grid (skipping those `sweep.json` says are done) and picks the best.

    Args:
        backbone: the frozen backbone, for runs trained in this process.
        loader: how to load the backbone in another process (load_backbone's arguments), for parallel runs.
        data_dirs, stop: as for trainer.train.train; on `stop`, runs in other processes stop too and JobCancelled
            is raised.
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
        report({"run": len(done), "runs": len(runs), "parallel": parallel, "last": row})

    requested, cores = (spec.sweep.parallel if spec.sweep else 1), usable_cores()
    parallel = max(1, min(requested, cores, len(todo)))
    extra = {"parallel": {"requested": requested, "cores": cores, "effective": parallel}}
    if parallel < requested:
        log.info("sweep %s: %d runs at once (asked for %d, %d usable cores)", spec.task, parallel, requested, cores)
    report({"run": len(done), "runs": len(runs), "parallel": parallel})
    if parallel > 1:
        assert loader is not None, "parallel runs load the backbone in their own processes"
        _parallel(todo, work_dir, parallel, max(1, cores // parallel), loader, data_dirs, stop, finish)
    else:
        assert backbone is not None
        for i, run in todo:
            report({"run": len(done) + 1, "runs": len(runs), "parallel": 1, "settings": _settings(run)})

            def inner(info: dict[str, Any], i: int = i) -> None:
                report({"run": i + 1, "runs": len(runs), "parallel": 1, **info})

            result = train(backbone, run, work_dir / _name(i), inner, data_dirs=data_dirs, stop=stop)
            finish(i, _row(run, result))
    bar.close()
    rows = [done[_name(i)] for i in range(len(runs))]
    metric = rows[0]["metric"]
    learned = [i for i, r in enumerate(rows) if not r.get("degenerate")]
    if not learned and spec.publish_degenerate:
        learned = list(range(len(rows)))
    scored = [(rows[i].get("val_metrics", rows[i]["metrics"]).get(metric, -math.inf), i) for i in learned]
    best = max(scored, key=lambda t: (t[0], -t[1]))[1] if scored else None  # ties go to the earlier run
    artifact = None
    if best is not None:
        artifact = decode((work_dir / _name(best) / "best.safetensors").read_bytes())
        artifact.training["sweep"] = {"runs": len(rows), "chosen": _name(best)}
    return SweepResult(rows, best, artifact, metric, table(rows, metric, best), extra)


def _parallel(
    todo: list[tuple[int, TrainSpec]],
    work_dir: Path,
    parallel: int,
    threads: int,
    loader: dict[str, Any],
    data_dirs: list[str] | None,
    stop: StopFlag | None,
    finish: Any,
) -> None:
    """Trains `todo` in `parallel` spawned processes. Waits in slices of 0.2 s so a cancel is seen: the processes'
    shared event stops their runs at the next step, queued runs are dropped, and JobCancelled is raised."""
    ctx = get_context("spawn")
    halt = ctx.Event()  # handed to each process as it starts (an initializer argument)
    with ProcessPoolExecutor(
        parallel, mp_context=ctx, initializer=_init_worker, initargs=(loader, threads, halt)
    ) as pool:
        futures = {pool.submit(_train_in_worker, r, str(work_dir / _name(i)), data_dirs): i for i, r in todo}
        pending = set(futures)
        while pending:
            if stop is not None and stop.is_set():
                halt.set()
                for future in pending:
                    future.cancel()
                raise JobCancelled("sweep cancelled")
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for future in finished:
                finish(futures[future], future.result())


def table(rows: list[dict[str, Any]], metric: str, best: int | None) -> str:
    """The grid as a markdown table: the validation metric chose, the dev metric is reported."""
    lines = [
        f"| run | method | P | lr | dev {metric} | val {metric} | reparam | pooling | init | steps | stop | "
        "trainable | seconds | note |",
        "|---|---|---:|---:|---:|---:|---|---|---|---:|---|---:|---:|---|",
    ]
    for i, r in enumerate(rows):
        note = "best" if i == best else ("degenerate" if r.get("degenerate") else "")
        value = r["metrics"].get(metric, float("nan"))
        val = r.get("val_metrics", {}).get(metric, float("nan"))
        lines.append(
            f"| {_name(i)} | {r['method']} | {r['num_virtual_tokens']} | {r['lr']:g} | {value:.4f} | {val:.4f} | "
            f"{r.get('reparam')} | {r.get('pooling') or 'default'} | {r.get('prefix_init') or 'default'} | "
            f"{r['steps']} | {r.get('stop', {}).get('reason', '')} | {r['trainable']:,} | {r['seconds']:.0f} | {note} |"
        )
    return "\n".join(lines)


def _name(i: int) -> str:
    return f"run-{i:02d}"


def _settings(run: TrainSpec) -> dict[str, Any]:
    return {
        "method": run.method,
        "lr": run.lr,
        "num_virtual_tokens": run.num_virtual_tokens,
        "reparam": run.reparam,
        "pooling": run.pooling,
        "prefix_init": run.prefix_init,
    }


def _row(run: TrainSpec, result: TrainResult) -> dict[str, Any]:
    return {
        **_settings(run),
        "metric": result.artifact.training.get("metric", "accuracy"),
        "metrics": result.metrics,
        "val_metrics": result.val_metrics,
        "steps": result.steps,
        "stop": result.stop,
        "seconds": result.artifact.training.get("train_seconds", 0.0),
        "degenerate": result.degenerate,
        "trainable": served_parameters(result.artifact),
    }


def served_parameters(artifact: PrefixArtifact) -> int:
    """The parameters a task serves: its prefix (key/values or soft prompt, as exported), bias deltas and head."""
    return sum(t.numel() for t in artifact.tensors())


# -- parallel runs (one process each, spawned) ---------------------------------------------------------------------
_WORKER_BACKBONE: Backbone | None = None
_WORKER_STOP: StopFlag | None = None


def _init_worker(loader: dict[str, Any], threads: int, stop: StopFlag | None = None) -> None:
    global _WORKER_BACKBONE, _WORKER_STOP
    torch.set_num_threads(threads)
    _WORKER_STOP = stop
    _WORKER_BACKBONE = load_backbone(**loader)


def _train_in_worker(run: TrainSpec, work_dir: str, data_dirs: list[str] | None = None) -> dict[str, Any]:
    assert _WORKER_BACKBONE is not None
    return _row(run, train(_WORKER_BACKBONE, run, work_dir, data_dirs=data_dirs, stop=_WORKER_STOP))
