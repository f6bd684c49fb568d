"""Domain errors of the service, and the one place that maps every domain error to an HTTP response.

Bodies follow the OpenAI error shape, so its client surfaces our messages: {"error": {"message", "type", "code"}}.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefix_store import (
    ArtifactError,
    ArtifactTooLarge,
    BackboneMismatch,
    PrefixStoreError,
    StoredArtifactCorrupt,
    StoreUnavailable,
    TaskNotFound,
    VersionConflict,
    VersionNotFound,
)
from prefix_store.jobs import JobNotFound

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of errors raised by the service itself (not the store)."""

    status = 400


class BadRequest(ServiceError):
    status = 400


class InvalidRequest(ServiceError):
    """A body that parses but does not make sense (e.g. both or neither of prompt and input_ids)."""

    status = 422


class PayloadTooLarge(ServiceError):
    status = 413


class InputTooLong(ServiceError):
    """Prefix + prompt + max new tokens do not fit the context window (or the server's token budget)."""

    status = 400


class Unsupported(ServiceError):
    """A request the backbone or the task cannot serve: generation on an encoder, classification without a head."""

    status = 400


class QueueFull(ServiceError):
    status = 429

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


class RequestTimeout(ServiceError):
    status = 504


class ClientGone(ServiceError):
    """The client disconnected before its answer was ready; its request was cancelled."""

    status = 499


class EngineFailure(ServiceError):
    """The model step itself failed (e.g. out of device memory); the requests in it are failed, not retried."""

    status = 500


# Most specific first: the first matching class decides the status.
_STATUS: list[tuple[type[Exception], int]] = [
    (StoredArtifactCorrupt, 500),
    (TaskNotFound, 404),
    (JobNotFound, 404),
    (VersionNotFound, 404),
    (BackboneMismatch, 409),
    (VersionConflict, 409),
    (ArtifactTooLarge, 413),
    (ArtifactError, 400),
    (StoreUnavailable, 503),
    (PrefixStoreError, 400),
]


def status_of(exc: Exception) -> int:
    if isinstance(exc, ServiceError):
        return exc.status
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_response(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    async def domain(request: Request, exc: Exception) -> JSONResponse:
        status = status_of(exc)
        if status >= 500 and status != 503:
            log.exception("unhandled error on %s %s", request.method, request.url.path)
        headers = getattr(exc, "headers", None)
        return error_response(status, str(exc), type(exc).__name__, headers)

    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {err.get('msg')}")
        return error_response(422, "invalid request: " + "; ".join(parts), "RequestValidationError")

    async def http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "HTTPError", getattr(exc, "headers", None))

    app.add_exception_handler(PrefixStoreError, domain)
    app.add_exception_handler(ServiceError, domain)
    app.add_exception_handler(RequestValidationError, validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http)  # type: ignore[arg-type]
