from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from prefix_store import StoreUnavailable

from ..auth import MetricsAuth, is_admin
from ..schemas import Health, Readiness
from ..state import Services, ServicesDep

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="Liveness: the process is up")
async def health() -> Health:
    return Health(status="ok")


@router.get(
    "/ready",
    response_model=Readiness,
    summary="Readiness: backbone loaded, engine running, Redis reachable, pinned and preloaded tasks resident",
    responses={503: {"model": Readiness, "description": "not ready; `checks` says which part failed"}},
)
async def ready(request: Request, services: ServicesDep) -> JSONResponse:
    """Open to probes; the failure messages and the backbone description (local paths, hosts) only with an admin
    key."""
    checks: dict[str, bool | str] = {
        "backbone": True,
        "engine": _engine_check(services),
        "prefix_events": services.host_cache.subscribed.is_set() or "not subscribed to prefix events",
        # Pinned and preloaded tasks resident (PREFIXSERVE_PRELOAD_TASKS): "loading N/M tasks" until they are.
        "warm": services.warm.progress if services.warm is not None else True,
    }
    compiled = services.engine.compiled
    if compiled is not None:  # PREFIXSERVE_COMPILE=on: "compiling decode graphs: 3/7 buckets" until all are
        checks["compile"] = compiled.progress.check
    try:
        await services.store.ping()
        checks["redis"] = True
    except StoreUnavailable as e:
        checks["redis"] = str(e)
    ok = all(v is True for v in checks.values())
    if is_admin(request):
        body = Readiness(ready=ok, checks=checks, backbone=services.backbone.describe())
    else:
        body = Readiness(ready=ok, checks={k: v is True for k, v in checks.items()})
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics (a metrics or admin key)",
    dependencies=[MetricsAuth],
    response_class=Response,
    responses={200: {"content": {"text/plain": {"example": "prefixserve_queue_depth 0.0\n"}}}},
)
async def metrics(request: Request, services: ServicesDep) -> Response:
    """Every series, or with `name[]` query parameters only those samples (see Metrics.exposition)."""
    body = await services.metrics.render(request.query_params.getlist("name[]"))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _engine_check(services: Services) -> bool | str:
    sched = services.scheduler
    if not sched.alive:
        return "scheduler loop is not running"
    return True if sched.healthy else (sched.fatal or sched.fault or "unhealthy")
