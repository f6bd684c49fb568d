"""Request ids: every HTTP request gets one (the client's X-Request-ID when it is a sane token, else a new one),
echoed in the X-Request-ID response header, in error bodies, and in every log line written while the request is
handled (the id lives in a context variable, which the request's tasks inherit).

The task version an inference request runs (`note_served`, once its Call has resolved it: a pin, the traffic split or
the current version) travels the same way: the X-Prefix-Version response header, and `task@N` in the log lines
written after it, uvicorn's access line included. It is kept in the request's scope state too (`version`, `served`),
since the access line is written from the task that sends the response, not always the one that resolved it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)
HEADER = b"x-request-id"
VERSION_HEADER = b"x-prefix-version"
_VALID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
current: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
served: contextvars.ContextVar[str | None] = contextvars.ContextVar("served_version", default=None)  # "task@N"


def note_served(state: Any, task: str, version: int) -> None:
    """Records the task version a request runs, in its scope state (`state`: the request's `request.state`) and for
    the log lines written from here on."""
    state.version = version
    state.served = f"{task}@{version}"
    served.set(state.served)


def request_id_of(headers: dict[bytes, bytes]) -> str:
    """The client's id when it is 1-128 characters of [A-Za-z0-9._:-] (anything else could forge log lines), else
    a new one."""
    given = headers.get(HEADER, b"").decode("latin-1")
    return given if _VALID.match(given) else uuid.uuid4().hex


class RequestIds:
    """Outermost ASGI layer: sets the request's id for everything under it and adds the response header. An error
    nothing below handled becomes a JSON 500 with the id (as every other error body), not Starlette's plain-text
    one; after the response has started, the connection is closed and the error logged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_of(dict(scope["headers"]))
        token = current.set(rid)
        served_token = served.set(None)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [*message.get("headers", []), (HEADER, rid.encode())]
                state = scope.get("state") or {}
                if state.get("version") is not None:
                    headers.append((VERSION_HEADER, str(state["version"]).encode()))
                    served.set(state["served"])  # for the access line, written by `send` in this task
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            error = {"message": "internal server error", "type": "InternalError", "code": 500, "request_id": rid}
            body = json.dumps({"error": error}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send_with_id({"type": "http.response.start", "status": 500, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        finally:
            served.reset(served_token)
            current.reset(token)


class RequestIdFilter(logging.Filter):
    """Gives every record a `request_id` attribute ("-" outside a request) and a `served` one (the task version the
    request runs, `task@N`; "-" before it is known or without one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current.get() or "-"
        record.served = served.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, the task version served (`served`,
    once the request runs one) and the exception, if any."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        if getattr(record, "served", "-") != "-":
            out["served"] = record.served
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)
