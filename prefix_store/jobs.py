"""The training job queue: a Redis Stream read through a consumer group, plus one hash per job for its state.

  N:train:jobs        stream of {"job": id}; consumer group "trainers"
  N:train:job:{id}    hash: state (queued | running | succeeded | failed), spec, progress, result, error, worker,
                      attempts, created_at, updated_at (JSON where structured)

Several workers share the group, each message going to one of them. A worker keeps its message's idle time low
with a heartbeat (XCLAIM ... JUSTID) while it trains; a message whose worker died goes idle and the next worker
takes it over with XAUTOCLAIM. A message is acknowledged only when its job has ended, either way.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import PrefixStoreError, StoreUnavailable

GROUP = "trainers"
_JSON_FIELDS = ("spec", "progress", "result")


class JobNotFound(PrefixStoreError, LookupError):
    pass


@dataclass(frozen=True)
class Claimed:
    message_id: str
    job_id: str
    deliveries: int  # how many times the message has been handed out, this time included
    reclaimed: bool  # taken over from a worker that went silent


class JobQueue:
    def __init__(self, client: aioredis.Redis, *, namespace: str = "prefixserve") -> None:
        self.client = client
        self.stream = f"{namespace}:train:jobs"
        self.prefix = f"{namespace}:train:job:"

    async def enqueue(self, spec: dict[str, Any]) -> str:
        job_id = uuid.uuid4().hex
        now = _now()
        try:
            async with self.client.pipeline(transaction=True) as pipe:
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
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise StoreUnavailable(f"Redis unreachable, job not queued: {e}") from e
        return job_id

    async def get(self, job_id: str) -> dict[str, Any]:
        try:
            raw = await self.client.hgetall(self.prefix + job_id)
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
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


__all__ = ["Claimed", "JobNotFound", "JobQueue"]
