from fastapi import APIRouter
from fastapi.responses import JSONResponse

from prefix_store import StoreUnavailable

from ..schemas import Health, Readiness
from ..state import ServicesDep

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
async def ready(services: ServicesDep) -> JSONResponse:
    checks: dict[str, bool | str] = {
        "backbone": True,
        "engine": services.scheduler.alive or "scheduler loop is not running",
        "prefix_events": services.prefixes.subscribed.is_set() or "not subscribed to prefix events",
    }
    try:
        await services.store.ping()
        checks["redis"] = True
    except StoreUnavailable as e:
        checks["redis"] = str(e)
    ok = all(v is True for v in checks.values())
    body = Readiness(ready=ok, checks=checks, backbone=services.backbone.describe())
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
