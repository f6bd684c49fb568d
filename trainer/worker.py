"""Running jobs: one from the command line, or forever from the Redis Stream as a worker of the consumer group."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

from pydantic import ValidationError

from prefix_store import PrefixStore, export_peft_adapter
from prefix_store.jobs import Claimed, JobQueue, TrainSpec
from service.runtime import Backbone

from .settings import TrainerSettings
from .sweep import run_sweep
from .train import TrainResult, train

log = logging.getLogger(__name__)


async def run_job(
    backbone: Backbone,
    store: PrefixStore,
    spec: TrainSpec,
    settings: TrainerSettings,
    job_id: str,
    on_progress: Any = None,
) -> dict[str, Any]:
    """Trains in a thread (the event loop keeps heartbeats going), then publishes unless the gate (or the guard
    against a run that learned nothing) says no. A spec with a sweep trains its grid and publishes the best run."""
    if spec.sweep is not None:
        return await _run_sweep(backbone, store, spec, settings, job_id, on_progress)
    result: TrainResult = await asyncio.to_thread(train, backbone, spec, settings.work_dir / job_id, on_progress)
    summary: dict[str, Any] = {"metrics": result.metrics, "steps": result.steps, "history": result.history}
    if result.degenerate:
        summary["degenerate"] = result.degenerate
    return await _publish(store, spec, result.artifact, result.metrics, result.degenerate, summary, backbone)


async def _run_sweep(
    backbone: Backbone, store: PrefixStore, spec: TrainSpec, settings: TrainerSettings, job_id: str, on_progress: Any
) -> dict[str, Any]:
    loader = settings.backbone_args()
    sweep = await asyncio.to_thread(run_sweep, backbone, spec, settings.work_dir / job_id, on_progress, loader)
    summary: dict[str, Any] = {"runs": sweep.rows, "table": sweep.table}
    if sweep.best is None or sweep.artifact is None:
        summary.update(published=False, reason="not published: every run of the sweep was degenerate")
        return summary
    best = sweep.rows[sweep.best]
    summary.update(best=best, metrics=best["metrics"], steps=best["steps"])
    return await _publish(store, spec, sweep.artifact, best["metrics"], best.get("degenerate"), summary, backbone)


async def _publish(
    store: PrefixStore,
    spec: TrainSpec,
    artifact: Any,
    metrics: dict[str, float],
    degenerate: str | None,
    summary: dict[str, Any],
    backbone: Backbone,
) -> dict[str, Any]:
    """Publishes `artifact` unless it is degenerate (and not asked for) or below the gate; exports PEFT if asked."""
    metric = artifact.training.get("metric", "metric")
    summary["published"] = False
    if degenerate and not spec.publish_degenerate:
        summary["reason"] = f"not published: {degenerate} (set publish_degenerate to publish it anyway)"
    elif spec.gate is not None and metrics.get(metric, float("-inf")) < spec.gate:
        summary["reason"] = f"dev {metric} {metrics.get(metric, float('nan')):.4f} is below the gate {spec.gate}"
    else:
        stored = await store.put(artifact)
        summary.update(published=True, version=stored.version)
    if spec.export_peft:
        export_peft_adapter(artifact, spec.export_peft, base_model_name_or_path=backbone.name)
        summary["peft_dir"] = spec.export_peft
    return summary


class Worker:
    def __init__(self, backbone: Backbone, store: PrefixStore, queue: JobQueue, settings: TrainerSettings) -> None:
        self.bb, self.store, self.queue, self.settings = backbone, store, queue, settings
        self.name = settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        await self.queue.ensure_group()
        log.info("trainer worker %s waiting for jobs on %s", self.name, self.queue.stream)
        while not stop.is_set():
            claimed = await self.queue.claim(self.name, idle_ms=int(self.settings.claim_idle_s * 1000))
            if claimed is not None:
                await self.handle(claimed)

    async def handle(self, claimed: Claimed) -> None:
        job_id, q = claimed.job_id, self.queue
        try:
            job = await q.get(job_id)
        except LookupError:
            await q.ack(claimed.message_id)
            return
        if job["state"] in ("succeeded", "failed"):
            await q.ack(claimed.message_id)
            return
        if claimed.deliveries > self.settings.max_attempts:
            await q.update(job_id, state="failed", error=f"gave up after {claimed.deliveries - 1} attempts")
            await q.ack(claimed.message_id)
            return
        try:
            spec = TrainSpec.model_validate(job["spec"])
        except ValidationError as e:
            await q.update(job_id, state="failed", error=f"invalid spec: {e}")
            await q.ack(claimed.message_id)
            return
        if claimed.reclaimed:
            log.warning("took over job %s (attempt %d) from a worker that went silent", job_id, claimed.deliveries)
        await q.update(job_id, state="running", worker=self.name, attempts=claimed.deliveries)
        beat = asyncio.create_task(self._heartbeat(claimed.message_id))
        try:
            result = await run_job(self.bb, self.store, spec, self.settings, job_id, self._progress(job_id))
            await q.update(job_id, state="succeeded", result=result)
            log.info("job %s done: %s", job_id, {k: v for k, v in result.items() if k != "history"})
        except Exception as e:  # the job fails, the worker goes on
            log.exception("job %s failed", job_id)
            await q.update(job_id, state="failed", error=f"{type(e).__name__}: {e}")
        finally:
            beat.cancel()
            await q.ack(claimed.message_id)

    async def _heartbeat(self, message_id: str) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            await self.queue.heartbeat(self.name, message_id)

    def _progress(self, job_id: str) -> Any:
        """A thread-safe progress callback writing at most once a second (and every evaluation) to the job."""
        loop = asyncio.get_running_loop()
        last = [0.0]

        def report(info: dict[str, Any]) -> None:
            now = time.monotonic()
            if "dev" in info or now - last[0] >= 1.0 or info.get("step") == info.get("steps"):
                last[0] = now
                asyncio.run_coroutine_threadsafe(self.queue.update(job_id, progress=_clean(info)), loop)

        return report


def _clean(info: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in info.items()}
