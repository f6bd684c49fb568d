"""The one place that maps errors to HTTP: the runtime's and the store's domain errors (which know nothing of HTTP)
and the few errors of the web layer itself, to a status and the OpenAI error body, so its client surfaces our
messages: {"error": {"message", "type", "code"}}.

On the OpenAI routes (OPENAI_PATHS) a request the server cannot take as it is, invalid (a wrong type, a missing or
unknown field: 422 elsewhere) or refused (400), is answered as OpenAI and vLLM answer it: 400, type
"invalid_request_error" and the field in "param", so the `openai` client raises BadRequestError.
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
from prefix_store.jobs import JobEnded, JobNotFound, JobPathError, PathNotAllowed
from prefix_store.tenants import KeyExists, KeyNotFound, TooManyKeys

from . import request_ids
from .runtime.errors import (
    EngineFailure,
    InputTooLong,
    Overloaded,
    PinRefused,
    QueueFull,
    RequestTimeout,
    ServingError,
    Unsupported,
)
from .runtime.grammar import InvalidGrammar

log = logging.getLogger(__name__)


# -- errors of the web layer ----------------------------------------------------------------------------------------
class WebError(Exception):
    """Errors about the HTTP request itself, raised by the routes."""


class BadRequest(WebError):
    pass


class InvalidRequest(WebError):
    """A body that parses but does not make sense (e.g. both or neither of prompt and input_ids)."""


class PayloadTooLarge(WebError):
    pass


class Forbidden(WebError):
    pass


class SourceNotFound(WebError):
    """An adapter named by reference (a hub repository or a path) that does not exist."""


class SourceUnavailable(WebError):
    """An adapter's source cannot be reached now (the hub offline or unreachable)."""


class RateLimited(WebError):
    """A key's requests or tokens per minute are used up (429), with Retry-After: `retry_after_s`, when this request
    would pass if nothing else were charged."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


class ClientGone(WebError):
    """The client disconnected before its answer was ready; its request was cancelled."""


class TemplateRefused(WebError):
    """A chat template refused the caller's messages on purpose (its raise_exception), or an uploaded template
    cannot render: the caller's to fix (400)."""


class ServerMisconfigured(WebError):
    """Something the operator or a task's owner configured is broken (e.g. a task's chat template): a 500 that says
    whose it is, not the caller's fault."""


# Most specific first: the first matching class decides the status.
_STATUS: list[tuple[type[Exception], int]] = [
    (BadRequest, 400),
    (InvalidRequest, 422),
    (PayloadTooLarge, 413),
    (Forbidden, 403),
    (SourceNotFound, 404),
    (SourceUnavailable, 503),
    (ClientGone, 499),
    (PinRefused, 507),
    (RateLimited, 429),
    (TemplateRefused, 400),
    (ServerMisconfigured, 500),
    (Overloaded, 503),
    (InputTooLong, 400),
    (Unsupported, 400),
    (InvalidGrammar, 400),
    (QueueFull, 429),
    (RequestTimeout, 504),
    (EngineFailure, 500),
    (StoredArtifactCorrupt, 500),
    (TaskNotFound, 404),
    (JobNotFound, 404),
    (KeyNotFound, 404),
    (KeyExists, 409),
    (TooManyKeys, 409),
    (JobEnded, 409),
    (PathNotAllowed, 403),  # a training job's path outside PREFIXSERVE_TRAIN_DATA_DIRS / PREFIXSERVE_EXPORT_DIRS
    (JobPathError, 400),
    (VersionNotFound, 404),
    (BackboneMismatch, 409),
    (VersionConflict, 409),
    (ArtifactTooLarge, 413),
    (ArtifactError, 400),
    (StoreUnavailable, 503),
    (PrefixStoreError, 400),
]


def status_of(exc: Exception) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def headers_of(exc: Exception) -> dict[str, str] | None:
    if isinstance(exc, (QueueFull, Overloaded)):
        return {"Retry-After": str(exc.retry_after_s)}
    return getattr(exc, "headers", None)


OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models")


def is_openai(request: Request) -> bool:
    path = request.url.path
    return any(path == p or path.startswith(p + "/") for p in OPENAI_PATHS)


def error_response(
    status: int,
    message: str,
    kind: str,
    headers: dict[str, str] | None = None,
    *,
    openai: bool = False,
    param: str | None = None,
) -> JSONResponse:
    """The error body; `openai`: OpenAI's own fields too ("param": the field at fault, or null)."""
    error: dict[str, object] = {"message": message, "type": kind, "code": status}
    if openai:
        error["param"] = param
    rid = request_ids.current.get()
    if rid is not None:
        error["request_id"] = rid
    return JSONResponse({"error": error}, status, headers=headers)


def _field(loc: tuple[int | str, ...]) -> str | None:
    """OpenAI's `param` for a validation error's location: the field path (`messages[0].content`), without the
    "body" root and pydantic's names for the branch of a union it tried (`constrained-str`, `list[int]`)."""
    path = ""
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier():
            path += f".{part}" if path else part
    return path or None


def _param(message: str) -> str | None:
    """The field a route's own refusal names first ("dimensions: ..."), for OpenAI's `param`."""
    head, sep, _ = message.partition(":")
    return head if sep and head.replace("_", "").replace(".", "").isalnum() else None


def install_error_handlers(app: FastAPI) -> None:
    async def domain(request: Request, exc: Exception) -> JSONResponse:
        status = status_of(exc)
        if status >= 500 and status not in (503, 507):  # 507: a pin past the budget, the operator's to choose
            log.exception("unhandled error on %s %s", request.method, request.url.path)
        if status in (400, 422) and is_openai(request):
            return error_response(
                400, str(exc), "invalid_request_error", headers_of(exc), openai=True, param=_param(str(exc))
            )
        return error_response(status, str(exc), type(exc).__name__, headers_of(exc))

    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts, fields = [], []
        for err in exc.errors():
            loc = err.get("loc", ())
            where = ".".join(str(x) for x in loc if x != "body") or "body"
            fields.append(_field(loc))
            parts.append(f"{where}: {err.get('msg')}")
        message = "invalid request: " + "; ".join(parts)
        if is_openai(request):
            param = fields[0] if fields else None
            return error_response(400, message, "invalid_request_error", openai=True, param=param)
        return error_response(422, message, "RequestValidationError")

    async def http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "HTTPError", getattr(exc, "headers", None))

    for base in (PrefixStoreError, ServingError, WebError):
        app.add_exception_handler(base, domain)
    # Starlette types every exception handler as taking Exception, not the class it is registered for.
    app.add_exception_handler(RequestValidationError, validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http)  # type: ignore[arg-type]
