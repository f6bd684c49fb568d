"""What the lifespan builds and the routes use, kept on app.state and reached through typed dependencies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from prefix_store import EmbeddedRedis, PrefixStore

from .cpu import CpuPools
from .memory import Trimmer
from .metrics import Metrics
from .runtime import Backbone, Engine, HostCache, Scheduler
from .runtime.warm import WarmSet
from .settings import ServiceSettings
from .templates import TemplateRenderer


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
    # CPU work of requests runs off the event loop, in bounded pools, one per kind (service/cpu.py).
    pools: CpuPools = field(default_factory=CpuPools.default)
    templates: TemplateRenderer | None = None  # chat templates, rendered in a child process (causal LMs)
    # Hands freed memory back after work that allocates a lot and frees it all (schemas, images, big responses).
    trimmer: Trimmer = field(default_factory=Trimmer)
    warm: WarmSet | None = None  # tasks kept resident: preloaded at start, pinned (runtime/warm.py)


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]
