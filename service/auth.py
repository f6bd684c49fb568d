"""Bearer-key auth with two scopes: inference keys call inference routes, admin keys call everything.

The key is checked by `service.guard.RequestGuard` from the request head, before any byte of the body is read;
the route dependencies below declare the scheme in the OpenAPI document and check the same key again.
With no keys configured the service is open; `service.__main__` only allows that on a loopback address.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .settings import ServiceSettings

_bearer = HTTPBearer(auto_error=False, description="an inference key or an admin key")

OPEN_PATHS = frozenset({"/health", "/ready", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
ADMIN_PREFIXES = ("/v1/tasks", "/v1/train", "/metrics")


def required_scope(path: str) -> str | None:
    """The scope a path needs: None (open), "inference" or "admin". Paths nobody routes need a key too, so an
    anonymous client learns nothing from them."""
    if path in OPEN_PATHS:
        return None
    if any(path == p or path.startswith(p + "/") for p in ADMIN_PREFIXES):
        return "admin"
    return "inference"


def _matches(key: str, keys: list[str]) -> bool:
    # Compare against every key so the time taken does not reveal which one (or whether any) matched.
    found = False
    for candidate in keys:
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


def key_scope(authorization: str | None, settings: ServiceSettings) -> str:
    """The scope an Authorization header grants: "admin" or "inference". Raises HTTPException 401 without a
    valid key. With auth disabled everything is "admin"."""
    if not settings.auth_enabled:
        return "admin"
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise HTTPException(
            401, "missing bearer key: send 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"}
        )
    key = key.strip()
    if _matches(key, settings.admin_keys):
        return "admin"
    if _matches(key, settings.api_keys):
        return "inference"
    raise HTTPException(401, "invalid bearer key", headers={"WWW-Authenticate": "Bearer"})


# Who sent the request being handled: set by the guard from the bearer key (the unit of fairness within a task).
client: contextvars.ContextVar[str] = contextvars.ContextVar("client", default="")


def client_id(authorization: str | None) -> str:
    """A stable, non-secret name for the key a request carries ("key:" + the start of its SHA-256), "" without
    one. The key itself never leaves this function."""
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return ""
    return "key:" + hashlib.sha256(key.strip().encode()).hexdigest()[:16]


def require(scope: str | None, granted: str) -> None:
    """Raises 403 when a key's granted scope does not cover the scope a route needs."""
    if scope == "admin" and granted != "admin":
        raise HTTPException(403, "this key may call inference routes only; admin routes need an admin key")


def _check(request: Request, needed: str) -> str:
    granted = key_scope(request.headers.get("authorization"), request.app.state.settings)
    require(needed, granted)
    return granted


def require_inference(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    return _check(request, "inference")


def require_admin(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    return _check(request, "admin")


def is_admin(request: Request) -> bool:
    """Whether the request carries an admin key (or auth is off): open routes show details only then."""
    try:
        return key_scope(request.headers.get("authorization"), request.app.state.settings) == "admin"
    except HTTPException:
        return False


InferenceAuth = Depends(require_inference)
AdminAuth = Depends(require_admin)
