"""The outermost ASGI layer: what a client without a key, or with a huge or slow body, may cost the server.

For every HTTP request, before any byte of the body is read:
  1. the bearer key is resolved to its principal (service.auth.KeyRing: environment keys, then stored keys, which
     may take a Redis lookup) and checked against the scope the path needs (401 / 403 at once; 503 when Redis
     cannot say whether a stored key is valid);
  2. on the routes that submit inference requests, a key already past its requests or tokens per minute is refused
     (429, service.limits.precheck: one read-only Redis script), before the body is read, tokenised or rendered;
  3. a declared Content-Length over the route's limit is refused (413).
While the body is read:
  4. received bytes are counted, declared or chunked, and the body is cut at the limit (413);
  5. each chunk must arrive within `body_timeout_s` of the previous one (408).
Uploads and training jobs get the artifact limit; every other route (/v1/keys too) the small JSON limit.
After a request whose body was large, freed memory is handed back to the OS (service.memory).
Pure ASGI, so routes still see client disconnects.
"""

from __future__ import annotations

import asyncio

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prefix_store import StoreUnavailable

from .auth import ANONYMOUS, KeyRing, client, principal, require, required_scope
from .http_errors import RateLimited, error_response
from .limits import COUNTED, precheck
from .memory import Trimmer
from .settings import ServiceSettings

LARGE_BODY = 64 * 1024  # bytes; a request with a body this large is followed by a memory trim
UPLOAD_PREFIXES = ("/v1/tasks", "/v1/train")  # the routes whose bodies may be artifacts or training data


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: ServiceSettings, keys: KeyRing) -> None:
        self.app = app
        self.settings = settings
        self.keys = keys
        self.admin_limit = settings.max_artifact_bytes + 1024**2  # an artifact plus the multipart framing
        self.trimmer = Trimmer()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        needed = required_scope(scope["path"])
        authorization = _text(headers.get(b"authorization"))
        try:
            if needed is None:
                who = await self.keys.peek(authorization)
            else:
                who = await self.keys.resolve(authorization)
                require(needed, who.scope)
        except HTTPException as e:
            await error_response(e.status_code, str(e.detail), "HTTPError", e.headers)(scope, receive, send)
            return
        except StoreUnavailable as e:
            msg = f"cannot check the bearer key: {e}"
            await error_response(503, msg, "StoreUnavailable", {"Retry-After": "1"})(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = who
        principal.set(who or ANONYMOUS)
        client.set(who.client if who is not None else "")
        path = scope["path"]
        if who is not None and who.limited and scope.get("method") == "POST" and path in COUNTED:
            try:
                await precheck(self.keys, who)
            except RateLimited as e:
                await error_response(429, str(e), "RateLimited", e.headers)(scope, receive, send)
                return
            except StoreUnavailable as e:
                msg = f"cannot check the key's limits: {e}"
                await error_response(503, msg, "StoreUnavailable", {"Retry-After": "1"})(scope, receive, send)
                return
        large = needed == "admin" and any(path == p or path.startswith(p + "/") for p in UPLOAD_PREFIXES)
        limit = self.admin_limit if large else self.settings.max_body_bytes
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            msg = f"request body is {int(declared)} bytes: the limit for {scope['path']} is {limit}"
            await error_response(413, msg, "PayloadTooLarge")(scope, receive, send)
            return
        received = [0]
        try:
            await self.app(scope, self._bounded(receive, limit, scope["path"], received), send)
        finally:
            if received[0] >= LARGE_BODY:
                self.trimmer.request()

    def _bounded(self, receive: Receive, limit: int, path: str, received: list[int]) -> Receive:
        """`receive` that counts body bytes, cuts the body past `limit` and times out a stalled body. Once the body
        is complete it passes messages straight through (a streaming route waits on it for the disconnect)."""
        done = False
        timeout = self.settings.body_timeout_s

        async def bounded() -> Message:
            nonlocal done
            if done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except TimeoutError:
                raise HTTPException(408, f"request body stalled: no data for {timeout:g}s") from None
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > limit:
                    raise HTTPException(413, f"request body exceeds the limit for {path} of {limit} bytes")
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        return bounded


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")
