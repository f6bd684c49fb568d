"""The FastAPI application: `create_app(settings)` wires the lifespan (Redis, backbone) and the routers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from prefix_store import StoreUnavailable, open_store

from .guard import RequestGuard
from .http_errors import install_error_handlers
from .metrics import Metrics
from .request_ids import RequestIds
from .routes import health, inference, openai, tasks, train
from .runtime import Backbone, build_serving, load_backbone
from .settings import ServiceSettings
from .state import Services
from .tracing import Tracing

log = logging.getLogger(__name__)

DESCRIPTION = """Serve many prompt-learning tasks (Prefix-Tuning, P-Tuning v2, prompt tuning, P-Tuning) on one frozen
backbone. Admin routes manage the per-task prefixes stored in Redis."""


def create_app(settings: ServiceSettings | None = None, *, backbone: Backbone | None = None) -> FastAPI:
    """Args:
    settings: the process settings (read from the environment when omitted).
    backbone: an already-loaded backbone (tests pass tiny ones); loaded from `settings.backbone` when omitted.
    """
    settings = settings or ServiceSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Opened on the event-loop thread on purpose: an embedded server's death signal follows the starting thread.
        store, embedded = open_store(
            settings.redis_url,
            settings.data_dir,
            namespace=settings.namespace,
            max_artifact_bytes=settings.max_artifact_bytes,
            min_replicas=settings.redis_min_replicas,
        )
        try:
            try:
                await store.migrate_layout()
            except StoreUnavailable as e:  # every read and write tries again first (see migrate_layout)
                log.error("%s", e)
            bb = backbone or await asyncio.to_thread(lambda: load_backbone(**settings.backbone_args()))
            scheduler = build_serving(
                bb,
                store,
                device_cache_bytes=settings.device_cache_bytes,
                host_cache_bytes=settings.host_cache_bytes,
                max_batch_size=settings.max_batch_size,
                max_batch_tokens=settings.max_batch_tokens,
                max_prefill_tokens=settings.max_prefill_tokens,
                max_queue=settings.max_queue,
            )
            host_cache = scheduler.host_cache
            host_cache.start()
            scheduler.start()
            with contextlib.suppress(TimeoutError):  # /ready reports it if the subscription is still missing
                await asyncio.wait_for(host_cache.subscribed.wait(), 5)
            services = Services(settings, store, bb, scheduler.engine, host_cache, scheduler, metrics, embedded)
            metrics.watch(scheduler, store)
            app.state.services = services
            log.info(
                "prefix-serve ready: backbone %s, store %s", bb.name, "embedded" if embedded else settings.redis_url
            )
            try:
                yield
            finally:
                await scheduler.stop()
                await host_cache.stop()
                services.tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        finally:
            await store.aclose()
            if embedded is not None:
                embedded.stop()

    app = FastAPI(title="prefix-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    metrics = Metrics()
    install_error_handlers(app)
    app.add_middleware(RequestGuard, settings=settings)
    app.add_middleware(Tracing)
    app.add_middleware(RequestIds)  # added last: outermost, so even the guard's refusals carry the id
    metrics.install(app)  # outermost: refused requests are counted too
    app.include_router(health.router)
    app.include_router(inference.router)
    app.include_router(openai.router)
    app.include_router(openai.tokens_router)
    app.include_router(tasks.router)
    app.include_router(train.router)
    return app
