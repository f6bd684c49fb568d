"""Training jobs: their record (TrainSpec, what the service queues and the trainer runs) and their queue, a Redis
Stream read through a consumer group, plus one hash per job for its state.

  {N:train}:jobs        stream of {"job": id}; consumer group "trainers"
  {N:train}:job:id      hash: state (queued | running | succeeded | failed), spec, progress, result, error, worker,
                      attempts, created_at, updated_at (JSON where structured)

Both share the hash tag {N:train} (keys.py), so queuing a job (its hash and its stream entry in one MULTI) works on
Redis Cluster too, where the whole queue lives in one slot.

Several workers share the group, each message going to one of them. A worker keeps its message's idle time low
with a heartbeat (XCLAIM ... JUSTID) while it trains; a message whose worker died goes idle and the next worker
takes it over with XAUTOCLAIM. A message is acknowledged only when its job has ended, either way.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from redis.exceptions import ResponseError

from .artifact import check_template, validate_task_name
from .errors import ArtifactError, PrefixStoreError, StoreUnavailable
from .keys import KeyLayout
from .store import TRANSIENT, Client, refresh_slots_on_fault

GROUP = "trainers"
_JSON_FIELDS = ("spec", "progress", "result")


class JobNotFound(PrefixStoreError, LookupError):
    pass


Method = Literal["prefix_tuning", "p_tuning_v2", "prompt_tuning", "p_tuning", "bitfit", "vpt_shallow", "vpt_deep"]


class SweepGrid(BaseModel):
    """A grid of training runs over one job's data: every combination of the listed methods, learning rates and
    prompt lengths (an omitted axis keeps the job's value, or the method's default). Each run is evaluated on the dev
    set through the serving engine; the best is published."""

    methods: list[Method] | None = Field(None, min_length=1, max_length=7)
    lrs: list[float] | None = Field(None, min_length=1, max_length=16)
    num_virtual_tokens: list[int] | None = Field(None, min_length=1, max_length=16)
    parallel: int = Field(1, ge=1, le=16, description="runs trained at once (processes sharing the machine's cores)")

    @model_validator(mode="after")
    def _size(self) -> SweepGrid:
        n = len(self.methods or [0]) * len(self.lrs or [0]) * len(self.num_virtual_tokens or [0])
        if n > 64:
            raise ValueError(f"sweep: expected at most 64 runs, the grid has {n}")
        if any(not 0 < lr <= 10 for lr in self.lrs or []):
            raise ValueError("sweep lrs: expected values in (0, 10]")
        if any(not 1 <= p <= 512 for p in self.num_virtual_tokens or []):
            raise ValueError("sweep num_virtual_tokens: expected values in [1, 512]")
        return self


class TrainSpec(BaseModel):
    task: str = Field(description="task name to publish under", examples=["sst2"])
    method: Method
    data: str | None = Field(None, description="training file (JSONL, CSV, TSV) on the trainer's machine")
    examples: list[dict[str, Any]] | None = Field(None, max_length=100_000, description="inline training records")
    dev_data: str | None = Field(None, description="dev file; default: hold out dev_fraction of train")
    dev_examples: list[dict[str, Any]] | None = Field(None, max_length=100_000)
    columns: dict[str, str] | None = Field(None, description='column mapping, e.g. {"input": "mr", "output": "ref"}')
    limit: int | None = Field(None, ge=1, description="read at most this many training records")
    dev_limit: int | None = Field(500, ge=1, description="evaluate on at most this many dev examples")
    dev_fraction: float = Field(0.1, gt=0, lt=1)
    labels: list[str] | None = Field(None, description="class names in head order (default: sorted labels)")

    num_virtual_tokens: int | None = Field(None, ge=1, le=512, description="default: the method's (trainer.methods)")
    reparam: bool | None = Field(None, description="MLP reparametrisation (default: on for prefix_tuning only)")
    reparam_hidden: int = Field(512, ge=8, le=8192)
    prompt_encoder: Literal["lstm", "mlp"] = "lstm"
    init_text: str | None = Field(
        None,
        max_length=10_000,
        description="prompt tuning: initialise from this text's embeddings; P-Tuning v2: from its keys/values",
    )
    prefix_init: Literal["activations", "random"] = Field(
        "activations",
        description="P-Tuning v2 (no reparametrisation): start from the backbone's keys/values of real tokens "
        "(init_text, else tokens drawn from the training inputs; Li & Liang sec. 7.2), or N(0, 1) as PEFT does",
    )

    steps: int = Field(200, ge=1, le=10_000_000)
    batch_size: int = Field(16, ge=1, le=4096)
    grad_accum: int = Field(1, ge=1, le=1024)
    lr: float | None = Field(None, gt=0, le=10, description="default: the method's (trainer.methods)")
    weight_decay: float = Field(0.0, ge=0, le=1)
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="default: the method's (trainer.methods)")
    max_length: int = Field(128, ge=4, le=8192, description="truncate inputs (and targets) to this many tokens")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="generation length at evaluation")
    eval_every: int = Field(50, ge=1)
    patience: int = Field(5, ge=1, description="stop after this many evaluations without improvement")
    checkpoint_every: int = Field(50, ge=1)
    seed: int = Field(0, ge=0)
    gate: float | None = Field(None, description="publish only if the best dev metric reaches this")
    publish_degenerate: bool = Field(
        False,
        description="publish even a run whose dev accuracy never rose above the majority class, or whose loss did "
        "not fall (by default such a run is reported and not published)",
    )
    pooling: Literal["pooler", "cls", "mean", "last_token"] | None = Field(
        None, description="what the classification head reads; default: what the backbone was trained with"
    )
    template: str | None = Field(
        None,
        max_length=1000,
        description='how the task writes its input, with {text} (and {text_pair}); "{text} [MASK]" is a null prompt',
    )
    verbalizer: dict[str, str] | None = Field(
        None,
        max_length=256,
        description="label -> one vocabulary word, read at [MASK] by the masked-LM head instead of a linear head",
    )
    sweep: SweepGrid | None = Field(None, description="train a grid of runs and publish the best (see SweepGrid)")
    export_peft: str | None = Field(None, description="also write a PEFT adapter directory here")

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        return validate_task_name(v)

    @model_validator(mode="after")
    def _data(self) -> TrainSpec:
        if (self.data is None) == (self.examples is None):
            raise ValueError("give exactly one of 'data' (a file) and 'examples' (inline records)")
        if self.dev_data is not None and self.dev_examples is not None:
            raise ValueError("give at most one of 'dev_data' and 'dev_examples'")
        if self.template is not None:
            try:
                check_template(self.template)
            except ArtifactError as e:
                raise ValueError(str(e)) from None
        if self.verbalizer is not None and self.pooling is not None:
            raise ValueError("a verbalizer reads [MASK]: give no pooling with it")
        return self


@dataclass(frozen=True)
class Claimed:
    message_id: str
    job_id: str
    deliveries: int  # how many times the message has been handed out, this time included
    reclaimed: bool  # taken over from a worker that went silent


class JobQueue:
    def __init__(self, client: Client, *, namespace: str = "prefixserve") -> None:
        keys = KeyLayout(namespace)
        self.client = client
        self.stream = keys.jobs
        self.prefix = keys.job_prefix

    async def enqueue(self, spec: dict[str, Any]) -> str:
        job_id = uuid.uuid4().hex
        now = _now()
        try:
            async with refresh_slots_on_fault(self.client), self.client.pipeline(transaction=True) as pipe:
                pipe.hset(
                    self.prefix + job_id,
                    mapping={
                        "state": "queued",
                        "spec": json.dumps(spec),
                        "attempts": 0,
                        "created_at": now,
                        "updated_at": now,
                    },
                )
                pipe.xadd(self.stream, {"job": job_id})
                await pipe.execute()
        except TRANSIENT as e:
            raise StoreUnavailable(f"Redis unreachable, job not queued: {e}") from e
        except ResponseError as e:  # e.g. the slot moved by a failover under the MULTI: EXECABORT, then MOVED
            raise StoreUnavailable(f"Redis refused the job, not queued: {e}") from e
        return job_id

    async def get(self, job_id: str) -> dict[str, Any]:
        try:
            raw = await self.client.hgetall(self.prefix + job_id)
        except TRANSIENT as e:
            raise StoreUnavailable(f"Redis unreachable: {e}") from e
        if not raw:
            raise JobNotFound(f"training job {job_id!r} not found")
        job: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
        for key in _JSON_FIELDS:
            if key in job:
                job[key] = json.loads(job[key])
        job["attempts"] = int(job.get("attempts", 0))
        job["job_id"] = job_id
        return job

    async def update(self, job_id: str, **fields: Any) -> None:
        data = {k: json.dumps(v) if k in _JSON_FIELDS else v for k, v in fields.items() if v is not None}
        await self.client.hset(self.prefix + job_id, mapping={**data, "updated_at": _now()})

    # -- consumers ----------------------------------------------------------------------------------------------
    async def ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def claim(self, consumer: str, *, idle_ms: int, block_ms: int = 1000) -> Claimed | None:
        """A message silent for idle_ms (its worker died), else a new one (waiting up to block_ms), else None."""
        _, messages, *_ = await self.client.xautoclaim(self.stream, GROUP, consumer, idle_ms, "0-0", count=1)
        reclaimed = bool(messages)
        if not messages:
            res = await self.client.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=1, block=block_ms)
            messages = res[0][1] if res else []
        if not messages:
            return None
        msg_id, fields = messages[0]
        msg_id = msg_id.decode()
        pending = await self.client.xpending_range(self.stream, GROUP, min=msg_id, max=msg_id, count=1)
        deliveries = int(pending[0]["times_delivered"]) if pending else 1
        return Claimed(msg_id, fields[b"job"].decode(), deliveries, reclaimed)

    async def heartbeat(self, consumer: str, message_id: str) -> None:
        """Resets the message's idle time, so no other worker takes it while this one is alive."""
        await self.client.xclaim(self.stream, GROUP, consumer, 0, [message_id], justid=True)

    async def ack(self, message_id: str) -> None:
        await self.client.xack(self.stream, GROUP, message_id)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


__all__ = ["Claimed", "JobNotFound", "JobQueue", "SweepGrid", "TrainSpec"]
