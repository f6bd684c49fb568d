"""POST /v1/train (admin) queues a training job for the trainer workers; GET /v1/train/{job_id} reads its state;
DELETE /v1/train/{job_id} cancels it.

A job's file paths are checked here, before anything is queued: `data` and `dev_data` must resolve (symbolic links
and `..` followed) inside PREFIXSERVE_TRAIN_DATA_DIRS, `export_peft` inside PREFIXSERVE_EXPORT_DIRS, else 403 and
nothing is read or queued. The worker checks again with its own settings before it reads.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query
from pydantic import BaseModel, Field

from prefix_store.jobs import MAX_JOB_INDEX, WORKER_SEEN_S, JobQueue, TrainSpec, check_job_paths

from ..auth import AdminAuth
from ..schemas import ErrorBody
from ..state import Services, ServicesDep

MAX_JOB_PAGE = 100  # jobs per listing page: each is one read of its record
router = APIRouter(prefix="/v1/train", tags=["training (admin)"], dependencies=[AdminAuth])
JobId = Annotated[
    str, Path(description="the id POST /v1/train returned", examples=["9f1c2e7a4b0d4c55a1e2f3a4b5c6d7e8"])
]


class TrainJob(BaseModel):
    job_id: str
    state: str = Field(description="queued | running | succeeded | failed | cancelled")
    spec: dict[str, Any] = Field(
        default_factory=dict, description="the job as submitted, without its inline examples (counted below)"
    )
    inline_examples: int = Field(0, description="how many inline training examples the job was given")
    inline_dev_examples: int = Field(0, description="how many inline dev examples the job was given")
    progress: dict[str, Any] | None = Field(
        None, description="step, steps, loss, latest validation metrics (val); a sweep's run, runs and parallel"
    )
    result: dict[str, Any] | None = Field(
        None,
        description="published version, dev metrics (scored once on the chosen version), val_metrics (what chose "
        "it), stop (reason: converged | patience | max_steps | epochs | max_time; step, seconds, best_val, best_step, "
        "best_seconds), guard (metric, majority, noise, n; degenerate says why a run was not published), history; a "
        "sweep's runs, table and parallel",
    )
    error: str | None = None
    worker: str | None = None
    attempts: int = 0
    created_at: str | None = None
    updated_at: str | None = None
    ended_at: str | None = Field(None, description="when it succeeded, failed or was cancelled")
    expires_at: str | None = Field(None, description="when its record expires (PREFIXSERVE_JOB_TTL_S after it ended)")
    cancelled_at: str | None = None
    released_at: str | None = Field(
        None, description="a job cancelled while it ran: when its worker stopped training and let it go"
    )
    workers_alive: int | None = Field(
        None,
        description=f"while the job is queued: trainer workers seen alive in the last {WORKER_SEEN_S:g} s; 0 means no "
        "worker consumes the queue (start one: `make worker`, or `python -m trainer worker`)",
    )

    model_config = {
        "json_schema_extra": {
            "example": {
                "job_id": "9f1c2e7a4b0d4c55a1e2f3a4b5c6d7e8",
                "state": "running",
                "spec": {"task": "sst2", "method": "p_tuning_v2", "data": "/data/sst2/train.tsv"},
                "inline_examples": 0,
                "inline_dev_examples": 0,
                "progress": {"step": 120, "steps": 1000, "loss": 0.41, "val": {"accuracy": 0.86}},
                "result": None,
                "error": None,
                "worker": "trainer-1-17",
                "attempts": 1,
                "created_at": "2026-11-23T22:00:00+00:00",
                "updated_at": "2026-11-23T22:03:10+00:00",
                "ended_at": None,
                "expires_at": None,
                "cancelled_at": None,
                "released_at": None,
                "workers_alive": None,
            }
        }
    }


SUBMIT_EXAMPLES: dict[str, Any] = {
    "inline": {
        "summary": "a classifier from inline examples",
        "value": {
            "task": "sentiment",
            "method": "p_tuning_v2",
            "examples": [
                {"text": "a gripping, beautifully made film", "label": "positive"},
                {"text": "dull and far too long", "label": "negative"},
            ],
            "steps": 50,
        },
    },
    "file": {
        "summary": "from a file inside PREFIXSERVE_TRAIN_DATA_DIRS, with a dev set and a gate",
        "value": {
            "task": "sst2",
            "method": "p_tuning_v2",
            "data": "/data/sst2/train.tsv",
            "dev_data": "/data/sst2/dev.tsv",
            "steps": 1000,
            "gate": 0.8,
        },
    },
}


def _queue(services: Services) -> JobQueue:
    s = services.settings
    return JobQueue(services.store.client, namespace=s.namespace, ttl_s=s.job_ttl_s)


@router.post(
    "",
    response_model=TrainJob,
    status_code=202,
    summary="Queue a training job",
    responses={
        400: {"model": ErrorBody, "description": "a path that is not absolute"},
        403: {"model": ErrorBody, "description": "data, dev_data or export_peft outside the allowed directories"},
        422: {"model": ErrorBody, "description": "invalid spec"},
    },
)
async def submit(spec: Annotated[TrainSpec, Body(openapi_examples=SUBMIT_EXAMPLES)], services: ServicesDep) -> TrainJob:
    s = services.settings
    check_job_paths(spec, data_dirs=s.train_data_dirs, export_dirs=s.export_dirs)  # 403 before anything is queued
    queue = _queue(services)
    job_id = await queue.enqueue(spec.model_dump(mode="json"))
    return await _job(queue, job_id)


class TrainJobPage(BaseModel):
    jobs: list[TrainJob] = Field(description="newest first")
    total: int = Field(description=f"jobs the listing can reach (the newest {MAX_JOB_INDEX}, records not expired)")
    offset: int
    limit: int


@router.get(
    "",
    response_model=TrainJobPage,
    summary="Recent training jobs, newest first, a page at a time",
    responses={
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "jobs": [
                            {
                                "job_id": "9f1c2e7a4b0d4c55a1e2f3a4b5c6d7e8",
                                "state": "running",
                                "spec": {"task": "sst2", "method": "p_tuning_v2", "steps": 1000},
                                "progress": {"step": 120, "steps": 1000, "loss": 0.41},
                                "created_at": "2026-12-06T03:00:00+00:00",
                            }
                        ],
                        "total": 1,
                        "offset": 0,
                        "limit": 20,
                    }
                }
            }
        },
        422: {"model": ErrorBody, "description": "offset or limit out of range"},
    },
)
async def recent(
    services: ServicesDep,
    offset: Annotated[int, Query(ge=0, le=MAX_JOB_INDEX, description="jobs to skip")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_JOB_PAGE, description=f"at most {MAX_JOB_PAGE}")] = 20,
) -> TrainJobPage:
    jobs, total = await _queue(services).recent(offset, limit)
    return TrainJobPage(jobs=[TrainJob(**j) for j in jobs], total=total, offset=offset, limit=limit)


@router.get(
    "/{job_id}",
    response_model=TrainJob,
    summary="A training job's state, progress and result",
    responses={404: {"model": ErrorBody, "description": "unknown job"}},
)
async def status(job_id: JobId, services: ServicesDep) -> TrainJob:
    return await _job(_queue(services), job_id)


async def _job(queue: JobQueue, job_id: str) -> TrainJob:
    """The job's view; a queued job's says how many workers could take it (none: it waits until one starts)."""
    job = TrainJob(**await queue.get(job_id))
    if job.state == "queued":
        job.workers_alive = await queue.workers_alive()
    return job


@router.delete(
    "/{job_id}",
    response_model=TrainJob,
    summary="Cancel a queued or running training job",
    description="A queued job is never started; a running one stops at its worker's next training step (within "
    "about PREFIXSERVE_CANCEL_POLL_S) and publishes nothing; `released_at` is set once its worker let it go. The "
    "answer is the job, now `cancelled`. A job that already ended is a 409 naming its state; an unknown id a 404.",
    responses={
        404: {"model": ErrorBody, "description": "unknown job"},
        409: {"model": ErrorBody, "description": "the job already succeeded, failed or was cancelled"},
    },
)
async def cancel(job_id: JobId, services: ServicesDep) -> TrainJob:
    queue = _queue(services)
    await queue.cancel(job_id)
    return TrainJob(**await queue.get(job_id))
