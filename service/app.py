"""The FastAPI application: `create_app(settings)` wires the lifespan (Redis, backbone) and the routers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from prefix_store import REGISTRY, StoreUnavailable, open_store
from prefix_store.replicas import ReplicaRegistry
from prefix_store.tenants import KeyStore

from .auth import KeyRing
from .guard import RequestGuard
from .http_errors import install_error_handlers
from .metrics import Metrics
from .replicas import announce, replica_id, replica_view
from .request_ids import RequestIds
from .routes import docs, health, inference, keys, openai, tasks, train, ui
from .runtime import Backbone, build_serving, load_backbone
from .runtime.compiled import warm_up as warm_compiled
from .runtime.warm import WarmSet
from .settings import ServiceSettings
from .state import Services
from .templates import TemplateRenderer
from .tracing import Tracing

log = logging.getLogger(__name__)

DESCRIPTION = (
    "Serve many prompt-learning tasks on one frozen backbone, mixed in one batch. Methods: "
    + "; ".join(m.summary for m in REGISTRY.values())
    + ". Admin routes manage the per-task adapters stored in Redis."
)


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
            await key_ring.start(KeyStore(store))  # stored API keys, and their revocations from every replica
            bb = backbone or await asyncio.to_thread(lambda: load_backbone(**settings.backbone_args()))
            scheduler = build_serving(
                bb,
                store,
                device_cache_bytes=settings.device_cache_bytes,
                pin_fraction=settings.pin_fraction,
                host_cache_bytes=settings.host_cache_bytes,
                max_batch_size=settings.max_batch_size,
                max_batch_tokens=settings.max_batch_tokens,
                max_prefill_tokens=settings.max_prefill_tokens,
                max_queue=settings.max_queue,
                max_step_failures=settings.max_step_failures,
                compile=settings.compile == "on",
            )
            scheduler.on_fatal = lambda reason: _give_up(app, reason)
            host_cache = scheduler.host_cache
            # Built before the subscription: it reads the pins at every one.
            kept_warm = WarmSet(scheduler, store, preload=settings.preload_tasks)
            host_cache.start()
            scheduler.start()
            with contextlib.suppress(TimeoutError):  # /ready reports it if the subscription is still missing
                await asyncio.wait_for(host_cache.subscribed.wait(), 5)
            kept_warm.start()
            with contextlib.suppress(TimeoutError):  # the pinned tasks, bounded alike; the preload goes on after
                await asyncio.wait_for(kept_warm.pins_read.wait(), 5)
            services = Services(settings, store, bb, scheduler.engine, host_cache, scheduler, metrics, embedded)
            services.warm = kept_warm  # /ready waits for its warm-up
            graphs = None
            if scheduler.engine.compiled is not None:  # the decode graphs, once the preloaded tasks are resident
                graphs = asyncio.create_task(
                    warm_compiled(scheduler.on_engine, scheduler.engine.compiled.progress, lambda: kept_warm.done)
                )
                graphs.add_done_callback(_log_failure("compiling the decode graphs"))
            if bb.tokenizer is not None and not bb.is_encoder:
                warm = asyncio.create_task(services.pools.grammar.run(scheduler.engine.grammars.warm_up))
                warm.add_done_callback(_log_failure("warming the grammar compiler"))
                services.templates = TemplateRenderer(
                    bb.tokenizer, budget_s=settings.template_budget_s, memory_bytes=settings.template_memory_bytes
                )
                if getattr(bb.tokenizer, "chat_template", None):  # chats will come: start the renderer meanwhile
                    await asyncio.get_running_loop().run_in_executor(None, services.templates.start)
            metrics.watch(scheduler, store, lambda: kept_warm.pinned)
            registry, replica = ReplicaRegistry(store.client, namespace=settings.namespace), replica_id()
            app.state.replica = replica
            announcer = asyncio.create_task(
                announce(registry, replica, lambda: replica_view(scheduler, bb.name), settings.replica_announce_s)
            )
            announcer.add_done_callback(_log_failure("announcing this replica"))
            app.state.services = services
            log.info(
                "prefix-serve ready: backbone %s, store %s", bb.name, "embedded" if embedded else settings.redis_url
            )
            try:
                yield
            finally:
                announcer.cancel()
                with contextlib.suppress(Exception):  # best effort: otherwise its view expires after its TTL
                    await asyncio.wait_for(registry.withdraw(replica), 2)
                await kept_warm.stop()
                if graphs is not None:
                    graphs.cancel()
                await scheduler.stop()
                await host_cache.stop()
                services.pools.shutdown()
                if services.templates is not None:
                    services.templates.stop()
        finally:
            await key_ring.stop()
            await store.aclose()
            if embedded is not None:
                embedded.stop()

    # /docs is service/routes/docs.py (Swagger UI from local assets); no /redoc: no package ships ReDoc's bundle.
    app = FastAPI(
        title="prefix-serve",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    key_ring = KeyRing(settings)  # who a bearer key is: read by the guard, the routes and the limits
    app.state.keys = key_ring
    app.state.fatal = None  # why the replica gave up (the engine cannot serve); the server then exits
    app.state.stop_server = None  # set by whoever runs the server: stops it
    metrics = Metrics()
    install_error_handlers(app)
    app.add_middleware(RequestGuard, settings=settings, keys=key_ring)
    app.add_middleware(Tracing)
    app.add_middleware(RequestIds)  # added last: outermost, so even the guard's refusals carry the id
    metrics.install(app)  # outermost: refused requests are counted too
    app.include_router(docs.router)
    app.include_router(health.router)
    app.include_router(inference.router)
    app.include_router(openai.router)
    app.include_router(openai.tokens_router)
    app.include_router(tasks.router)
    app.include_router(train.router)
    app.include_router(keys.router)
    app.include_router(ui.router)
    app.include_router(ui.api)
    return app


def _give_up(app: FastAPI, reason: str) -> None:
    """The engine cannot serve any more (a device fault, or failed steps in a row): /ready already says so; the
    server stops, so its supervisor (Kubernetes, systemd, compose) restarts the process."""
    app.state.fatal = reason
    if app.state.stop_server is not None:
        app.state.stop_server()


def _log_failure(what: str):
    def done(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s failed: %s", what, task.exception())

    return done
