"""Running jobs: one from the command line, or forever from the Redis Stream as a worker of the consumer group.

Two ways in, two sets of rules:

- The command line (`python -m trainer train|sweep`) is run by a local operator with their own file permissions:
  it reads any `--data` path and writes `--export-peft` wherever it is told, and fails fast when Redis is down.
- A worker runs what anyone who can queue a job (an admin key, or write access to Redis) asked for, with the worker's
  file permissions: data and images only from PREFIXSERVE_TRAIN_DATA_DIRS, exports only into PREFIXSERVE_EXPORT_DIRS
  (none by default), both checked here again whatever the service checked at submission (it may run with other
  settings, or on another machine). It outlives Redis restarts (every call retried with backoff), stops a job that
  is cancelled (between two steps) without publishing it, and ends each job's record so that it expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ValidationError
from redis.exceptions import ResponseError

from prefix_store import PrefixStore, StoreUnavailable, export_peft_adapter
from prefix_store.jobs import (
    ENDED,
    EXPORT_SETTING,
    Claimed,
    JobPathError,
    JobQueue,
    TrainSpec,
    allowed_path,
    check_job_id,
    check_job_paths,
)
from prefix_store.store import TRANSIENT
from service.runtime import Backbone

from .settings import TrainerSettings
from .sweep import run_sweep
from .train import JobCancelled, TrainResult, train

log = logging.getLogger(__name__)
T = TypeVar("T")
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
_REDIS_DOWN = (StoreUnavailable, *TRANSIENT)


def _unreachable(e: BaseException) -> bool:
    """Whether `e` says Redis could not be reached (worth waiting out), as opposed to Redis refusing the command or
    too few replicas confirming a write (StoreUnavailable too, but repeating it would not help, and a publish
    repeated on those would store a version each time)."""
    return isinstance(e, TRANSIENT) or (isinstance(e, StoreUnavailable) and isinstance(e.__cause__, TRANSIENT))


@dataclass
class JobControls:
    """What the queue path puts around a job (the command line runs with none of it: any path, no cancel, no retry).

    data_dirs / export_dirs: where the job may read data and write its PEFT export (None: anywhere).
    stop: set when the job is cancelled; training stops at its next step.
    confirm: awaited right before publishing; raises JobCancelled if the job was cancelled meanwhile.
    redis: runs a Redis call, retrying it while Redis is unreachable (the publish of a finished job waits for Redis).
    """

    data_dirs: list[str] | None = None
    export_dirs: list[str] | None = None
    stop: threading.Event | None = None
    confirm: Callable[[], Awaitable[None]] | None = None
    redis: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]] | None = None


async def run_job(
    backbone: Backbone,
    store: PrefixStore,
    spec: TrainSpec,
    settings: TrainerSettings,
    job_id: str,
    on_progress: Any = None,
    controls: JobControls | None = None,
) -> dict[str, Any]:
    """Trains in a thread (the event loop keeps heartbeats going), then publishes unless the gate (or the guard
    against a run that learned nothing) says no. A spec with a sweep trains its grid and publishes the best run."""
    c = controls or JobControls()
    if spec.sweep is not None:
        return await _run_sweep(backbone, store, spec, settings, job_id, on_progress, c)
    result: TrainResult = await asyncio.to_thread(
        train, backbone, spec, settings.work_dir / job_id, on_progress, data_dirs=c.data_dirs, stop=c.stop
    )
    summary: dict[str, Any] = {
        "metrics": result.metrics,  # dev, measured once on the chosen version
        "val_metrics": result.val_metrics,  # the validation split's, what the version was chosen on
        "steps": result.steps,
        "stop": result.stop,  # why training stopped (converged, patience, max_steps, epochs, max_time), when, the best
        "guard": result.guard,  # the degeneracy guard's numbers: metric, majority, noise, n, first and last loss
        "history": result.history,
    }
    if result.degenerate:
        summary["degenerate"] = result.degenerate
    return await _publish(store, spec, result.artifact, result.metrics, result.degenerate, summary, backbone, c)


async def _run_sweep(
    backbone: Backbone,
    store: PrefixStore,
    spec: TrainSpec,
    settings: TrainerSettings,
    job_id: str,
    on_progress: Any,
    c: JobControls,
) -> dict[str, Any]:
    loader = settings.backbone_args()
    sweep = await asyncio.to_thread(
        run_sweep,
        backbone,
        spec,
        settings.work_dir / job_id,
        on_progress,
        loader,
        data_dirs=c.data_dirs,
        stop=c.stop,
    )
    summary: dict[str, Any] = {"runs": sweep.rows, "table": sweep.table, **sweep.extra}
    if sweep.best is None or sweep.artifact is None:
        summary.update(published=False, reason="not published: every run of the sweep was degenerate")
        return summary
    best = sweep.rows[sweep.best]
    summary.update(best=best, metrics=best["metrics"], val_metrics=best.get("val_metrics"), steps=best["steps"])
    return await _publish(store, spec, sweep.artifact, best["metrics"], best.get("degenerate"), summary, backbone, c)


async def _publish(
    store: PrefixStore,
    spec: TrainSpec,
    artifact: Any,
    metrics: dict[str, float],
    degenerate: str | None,
    summary: dict[str, Any],
    backbone: Backbone,
    c: JobControls,
) -> dict[str, Any]:
    """Publishes `artifact` unless it is degenerate (and not asked for) or below the gate; exports PEFT if asked."""
    metric = artifact.training.get("metric", "metric")
    summary["published"] = False
    export_dir = None
    if spec.export_peft and c.export_dirs is not None:  # checked before anything is published or written
        export_dir = allowed_path(spec.export_peft, c.export_dirs, what="export_peft", setting=EXPORT_SETTING)
        for name in PEFT_FILES:  # a file already there may be a symbolic link out of the allowed directories
            allowed_path(export_dir / name, c.export_dirs, what=f"export_peft's {name}", setting=EXPORT_SETTING)
    if c.confirm is not None:
        await c.confirm()  # a job cancelled while it trained publishes nothing
    if degenerate and not spec.publish_degenerate:
        summary["reason"] = f"not published: {degenerate} (set publish_degenerate to publish it anyway)"
    elif spec.gate is not None and metrics.get(metric, float("-inf")) < spec.gate:
        summary["reason"] = f"dev {metric} {metrics.get(metric, float('nan')):.4f} is below the gate {spec.gate}"
    else:
        stored = await (c.redis(lambda: store.put(artifact)) if c.redis else store.put(artifact))
        summary.update(published=True, version=stored.version)
    if spec.export_peft:
        export_peft_adapter(artifact, export_dir or spec.export_peft, base_model_name_or_path=backbone.name)
        summary["peft_dir"] = spec.export_peft
    return summary


class Worker:
    def __init__(self, backbone: Backbone, store: PrefixStore, queue: JobQueue, settings: TrainerSettings) -> None:
        self.bb, self.store, self.queue, self.settings = backbone, store, queue, settings
        self.name = settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"
        self._stop = asyncio.Event()
        self._group_ready = False

    async def run(self, stop: asyncio.Event | None = None) -> None:
        self._stop = stop or asyncio.Event()
        log.info("trainer worker %s waiting for jobs on %s", self.name, self.queue.stream)
        alive = asyncio.create_task(self._alive())
        try:
            while not self._stop.is_set():
                try:
                    claimed = await self.redis(self._claim)
                except _Stopping:
                    break
                if claimed is not None:
                    try:
                        await self.handle(claimed)
                    except _Stopping:  # stopped while Redis was down: the message stays pending for the next worker
                        break
        finally:
            alive.cancel()
            with contextlib.suppress(*_REDIS_DOWN):
                await self.queue.worker_gone(self.name)

    async def _alive(self) -> None:
        """Says this worker is alive every heartbeat_s, waiting or training (training runs in a thread), so the
        service can tell a job queued behind busy workers from one that no worker will take (JobQueue.workers_alive).
        A note Redis misses is just late; the next one goes through."""
        while True:
            try:
                await self.queue.worker_seen(self.name)
            except Exception as e:  # Redis down or refusing: the note is late, never the end of the worker
                log.debug("worker %s: alive note not written (%s)", self.name, e)
            await asyncio.sleep(self.settings.heartbeat_s)

    async def _claim(self) -> Claimed | None:
        if not self._group_ready:
            await self.queue.ensure_group()
            self._group_ready = True
        try:
            return await self.queue.claim(self.name, idle_ms=int(self.settings.claim_idle_s * 1000))
        except ResponseError as e:
            if "NOGROUP" in str(e):  # Redis came back without its data: make the group again
                self._group_ready = False
                return None
            raise

    async def redis(self, call: Callable[[], Awaitable[T]]) -> T:
        """Runs `call`, trying again with exponential backoff (0.1 s up to redis_retry_max_s) for as long as Redis is
        unreachable: a restart of Redis (every restart of `make serve` restarts its embedded one) is waited out,
        never the end of the worker. Raises _Stopping when the worker is told to stop meanwhile."""
        delay, failures = 0.1, 0
        while True:
            try:
                result = await call()
            except _REDIS_DOWN as e:
                if not _unreachable(e):
                    raise
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    log.warning("Redis unreachable (%s: %s); trying again (attempt %d)", type(e).__name__, e, failures)
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                    raise _Stopping from e
                except TimeoutError:
                    pass
                delay = min(delay * 2, self.settings.redis_retry_max_s)
                continue
            if failures:
                log.info("Redis reachable again after %d failed attempts", failures)
            return result

    async def handle(self, claimed: Claimed) -> None:
        job_id, q = claimed.job_id, self.queue
        try:
            check_job_id(job_id)  # it names a directory under the work directory
            job = await self.redis(lambda: q.get(job_id))
        except LookupError:  # expired, deleted, or not a job id at all
            await self.redis(lambda: q.ack(claimed.message_id))
            return
        if job["state"] in ENDED:  # a job cancelled while queued is never started
            await self.redis(lambda: q.ack(claimed.message_id))
            return
        if claimed.deliveries > self.settings.max_attempts:
            error = f"gave up after {claimed.deliveries - 1} attempts"
            await self.redis(lambda: q.finish(job_id, "failed", error=error))
            await self.redis(lambda: q.ack(claimed.message_id))
            return
        if not await self.redis(lambda: q.start(job_id, self.name, claimed.deliveries)):
            await self.redis(lambda: q.ack(claimed.message_id))  # cancelled (or gone) since we read it
            return
        if claimed.reclaimed:
            log.warning("took over job %s (attempt %d) from a worker that went silent", job_id, claimed.deliveries)
        stop = threading.Event()
        watch = asyncio.create_task(self._watch(claimed.message_id, job_id, stop))
        try:
            await self._run(job_id, stop)
        except _Stopping:  # its end not recorded: the message stays pending, and the next worker takes the job over
            raise
        except Exception:  # a store error the job's own handling did not expect: the worker goes on
            log.exception("job %s: its end could not be recorded", job_id)
        finally:
            watch.cancel()
        await self.redis(lambda: q.ack(claimed.message_id))

    async def _run(self, job_id: str, stop: threading.Event) -> None:
        q, s = self.queue, self.settings
        try:
            raw = await self.redis(lambda: q.spec(job_id))
            spec = TrainSpec.model_validate(raw)
            # Again here, whatever the service checked: this process reads the files, with its own settings.
            spec = check_job_paths(spec, data_dirs=s.train_data_dirs, export_dirs=s.export_dirs)
        except (ValidationError, JobPathError, LookupError) as e:
            error = f"invalid spec: {e}" if isinstance(e, ValidationError) else str(e)
            await self.redis(lambda: q.finish(job_id, "failed", error=error))
            return

        async def confirm() -> None:
            if await self.redis(lambda: q.state(job_id)) != "running":
                stop.set()
                raise JobCancelled(f"job {job_id} was cancelled")

        controls = JobControls(s.train_data_dirs, s.export_dirs, stop, confirm, self.redis)
        try:
            result = await run_job(self.bb, self.store, spec, s, job_id, self._progress(job_id), controls)
        except JobCancelled:
            log.info("job %s cancelled: training stopped, nothing published", job_id)
            await self.redis(lambda: q.finish(job_id, "failed", error="cancelled"))  # records released_at only
            return
        except _Stopping:
            raise
        except Exception as e:  # the job fails, the worker goes on
            log.exception("job %s failed", job_id)
            error = f"{type(e).__name__}: {e}"
            await self.redis(lambda: q.finish(job_id, "failed", error=error))
            return
        if await self.redis(lambda: q.finish(job_id, "succeeded", result=result)):
            log.info("job %s done: %s", job_id, {k: v for k, v in result.items() if k != "history"})

    async def _watch(self, message_id: str, job_id: str, stop: threading.Event) -> None:
        """While the job runs: a heartbeat every heartbeat_s (so no other worker takes it over), and its state read
        every cancel_poll_s: once it is no longer running (cancelled, or its record gone), `stop` is set and the
        training thread stops at its next step. Redis errors are logged and waited out; the job trains on."""
        s = self.settings
        last_beat = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(min(s.cancel_poll_s, s.heartbeat_s))
            try:
                state = await self.queue.state(job_id)
                if state != "running":  # cancelled (or its record deleted); an end of our own is ignored
                    if state in ("cancelled", None):
                        log.info("job %s was cancelled: stopping it at its next step", job_id)
                    stop.set()
                    return
                if time.monotonic() - last_beat >= s.heartbeat_s:
                    await self.queue.heartbeat(self.name, message_id)
                    last_beat = time.monotonic()
            except _REDIS_DOWN as e:
                log.warning("job %s: Redis unreachable while it trains (%s); it trains on", job_id, e)

    def _progress(self, job_id: str) -> Any:
        """A thread-safe progress callback writing at most once a second (and every evaluation) to the job; a write
        that fails (Redis restarting) is dropped, the next one goes through."""
        loop = asyncio.get_running_loop()
        last = [0.0]

        async def write(info: dict[str, Any]) -> None:
            try:
                await self.queue.progress(job_id, info)
            except _REDIS_DOWN as e:
                log.debug("job %s: progress not written (%s)", job_id, e)

        def report(info: dict[str, Any]) -> None:
            now = time.monotonic()
            if "val" in info or now - last[0] >= 1.0 or info.get("step") == info.get("steps"):
                last[0] = now
                asyncio.run_coroutine_threadsafe(write(_clean(info)), loop)

        return report


class _Stopping(Exception):
    """The worker was told to stop while it waited for Redis."""


def _clean(info: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in info.items()}
