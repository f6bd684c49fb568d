"""Which replica holds what: each service replica announces its view every few seconds (its backbone, its load, the
task versions resident in its device prefix cache and those it holds pinned), so an operator's console can show
residency per replica without reaching every replica itself. A view expires unless announced again, so a replica
that stopped or lost Redis disappears from the listing within its TTL.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .errors import StoreUnavailable
from .keys import KeyLayout
from .store import TRANSIENT, Client, refresh_slots_on_fault, reply

MAX_REPLICAS = 1024  # replicas a listing reads, the most recently announced first
MAX_VIEW_BYTES = 1 << 20  # one replica's view, JSON: a bound on what an announcement may write


class ReplicaRegistry:
    def __init__(self, client: Client, *, namespace: str = "prefixserve") -> None:
        keys = KeyLayout(namespace)
        self.client, self.index, self.prefix = client, keys.replicas, keys.replica_prefix

    async def announce(self, replica: str, view: dict[str, Any], ttl_s: float) -> None:
        """Stores `view` as replica `replica`'s, for `ttl_s` seconds; forgets replicas silent for an hour."""
        data = json.dumps({**view, "replica": replica, "at": time.time()}, separators=(",", ":"))
        if len(data) > MAX_VIEW_BYTES:
            raise ValueError(f"a replica's view is {len(data)} bytes of JSON; at most {MAX_VIEW_BYTES}")
        now = time.time()
        try:
            async with refresh_slots_on_fault(self.client), self.client.pipeline(transaction=True) as pipe:
                pipe.set(self.prefix + replica, data, px=max(1, int(ttl_s * 1000)))
                pipe.zadd(self.index, {replica: now})
                pipe.zremrangebyscore(self.index, "-inf", now - 3600)
                pipe.expire(self.index, 3600)
                await pipe.execute()
        except TRANSIENT as e:
            raise StoreUnavailable(f"Redis unreachable, replica not announced: {e}") from e

    async def withdraw(self, replica: str) -> None:
        """A replica stopping: its view goes at once, not after its TTL."""
        async with refresh_slots_on_fault(self.client), self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self.prefix + replica)
            pipe.zrem(self.index, replica)
            await pipe.execute()

    async def views(self) -> list[dict[str, Any]]:
        """The views of the replicas announced within their TTL, the most recent first."""
        try:
            ids: list[bytes] = await reply(self.client.zrevrange(self.index, 0, MAX_REPLICAS - 1))
            if not ids:
                return []
            raw: list[bytes | None] = await reply(self.client.mget([self.prefix + i.decode() for i in ids]))
        except TRANSIENT as e:
            raise StoreUnavailable(f"Redis unreachable: {e}") from e
        return [json.loads(r) for r in raw if r is not None]
