"""What the lifespan builds and the routes use, kept on app.state and reached through typed dependencies."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from prefix_store import EmbeddedRedis, PrefixStore

from .metrics import Metrics
from .runtime import Backbone, Engine, HostCache, Scheduler
from .settings import ServiceSettings


@dataclass
class Services:
    settings: ServiceSettings
    store: PrefixStore
    backbone: Backbone
    engine: Engine
    host_cache: HostCache
    scheduler: Scheduler
    metrics: Metrics
    embedded_redis: EmbeddedRedis | None = None
    # Tokenisation runs here, off the event loop. Two threads, not the default executor's one per core plus four:
    # each thread that allocates gets its own glibc arena, and arenas keep what they once held.
    tokenizer_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
    )


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]
