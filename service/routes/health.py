from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from prefix_store import StoreUnavailable

from ..auth import AdminAuth, is_admin
from ..schemas import Health, Readiness
from ..state import Services, ServicesDep

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="Liveness: the process is up")
async def health() -> Health:
    return Health(status="ok")


@router.get(
    "/ready",
    response_model=Readiness,
    summary="Readiness: backbone loaded, engine running, Redis reachable",
    responses={503: {"model": Readiness, "description": "not ready; `checks` says which part failed"}},
)
async def ready(request: Request, services: ServicesDep) -> JSONResponse:
    """Open to probes; the failure messages and the backbone description (local paths, hosts) only with an admin
    key."""
    checks: dict[str, bool | str] = {
        "backbone": True,
        "engine": _engine_check(services),
        "prefix_events": services.host_cache.subscribed.is_set() or "not subscribed to prefix events",
    }
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
    summary="Prometheus metrics (admin)",
    dependencies=[AdminAuth],
    response_class=Response,
    responses={200: {"content": {"text/plain": {"example": "prefixserve_queue_depth 0.0\n"}}}},
)
async def metrics(services: ServicesDep) -> Response:
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _engine_check(services: Services) -> bool | str:
    sched = services.scheduler
    if not sched.alive:
        return "scheduler loop is not running"
    return True if sched.healthy else (sched.fatal or sched.fault or "unhealthy")
