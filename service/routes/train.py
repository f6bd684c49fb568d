"""POST /v1/train (admin) queues a training job for the trainer workers; GET /v1/train/{job_id} reads its state."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from prefix_store.jobs import JobQueue, TrainSpec

from ..auth import AdminAuth
from ..schemas import ErrorBody
from ..state import ServicesDep

router = APIRouter(prefix="/v1/train", tags=["training (admin)"], dependencies=[AdminAuth])


class TrainJob(BaseModel):
    job_id: str
    state: str = Field(description="queued | running | succeeded | failed")
    spec: dict[str, Any] = Field(default_factory=dict)
    progress: dict[str, Any] | None = Field(None, description="step, steps, loss, latest dev metrics")
    result: dict[str, Any] | None = Field(None, description="published version, dev metrics, history")
    error: str | None = None
    worker: str | None = None
    attempts: int = 0
    created_at: str | None = None
    updated_at: str | None = None

    model_config = {
        "json_schema_extra": {
            "example": {
                "job_id": "9f1c2e7a4b0d4c55a1e2f3a4b5c6d7e8",
                "state": "running",
                "spec": {"task": "sst2", "method": "p_tuning_v2", "data": "/data/sst2/train.tsv"},
                "progress": {"step": 120, "steps": 1000, "loss": 0.41, "dev": {"accuracy": 0.86}},
                "result": None,
                "error": None,
                "worker": "trainer-1-17",
                "attempts": 1,
                "created_at": "2026-11-23T22:00:00+00:00",
                "updated_at": "2026-11-23T22:03:10+00:00",
            }
        }
    }


@router.post(
    "",
    response_model=TrainJob,
    status_code=202,
    summary="Queue a training job",
    responses={422: {"model": ErrorBody, "description": "invalid spec"}},
)
async def submit(spec: TrainSpec, services: ServicesDep) -> TrainJob:
    queue = JobQueue(services.store.client, namespace=services.settings.namespace)
    job_id = await queue.enqueue(spec.model_dump(mode="json"))
    return TrainJob(**await queue.get(job_id))


@router.get(
    "/{job_id}",
    response_model=TrainJob,
    summary="A training job's state, progress and result",
    responses={404: {"model": ErrorBody, "description": "unknown job"}},
)
async def status(job_id: str, services: ServicesDep) -> TrainJob:
    return TrainJob(**await JobQueue(services.store.client, namespace=services.settings.namespace).get(job_id))
