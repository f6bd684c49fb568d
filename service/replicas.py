"""This replica's announcements (prefix_store.replicas): every PREFIXSERVE_REPLICA_ANNOUNCE_S seconds its view (the
backbone, queue and running rows, the task versions resident in its device prefix cache and those held pinned) goes
to Redis, where the console reads the views of every replica (GET /ui/api/replicas)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any

from prefix_store import StoreUnavailable
from prefix_store.replicas import ReplicaRegistry

from .metrics import snapshot
from .runtime import Scheduler

log = logging.getLogger(__name__)


def replica_id() -> str:
    """The host's name (a pod's name under Kubernetes), the process id and a few random characters: unique among
    live replicas, several apps of one process (tests) included."""
    return f"{socket.gethostname()[:200]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def replica_view(scheduler: Scheduler, backbone: str) -> dict[str, Any]:
    """What this replica holds now, read from the loop while the engine's thread may change it (metrics.snapshot)."""
    cache = scheduler.engine.device_cache
    resident: dict[str, list[int]] = {}
    for task, version in sorted(snapshot(lambda: list(cache.entries))):
        resident.setdefault(task, []).append(version)
    pinned = {task: key[1] for task, key in snapshot(lambda: list(cache.pins.items()))}
    return {
        "backbone": backbone,
        "queue": scheduler.queue_depth,
        "running": scheduler.running,
        "resident": resident,
        "pinned": pinned,
    }


async def announce(registry: ReplicaRegistry, replica: str, view: Callable[[], dict[str, Any]], every_s: float) -> None:
    """Announces `view()` every `every_s` seconds until cancelled; a Redis outage is logged once and retried."""
    failing = False
    while True:
        try:
            await registry.announce(replica, view(), ttl_s=3 * every_s)
            failing = False
        except (StoreUnavailable, ValueError) as e:
            if not failing:
                log.warning("could not announce this replica's view (retrying every %gs): %s", every_s, e)
            failing = True
        await asyncio.sleep(every_s)
