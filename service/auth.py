"""Bearer-key auth with two scopes: inference keys call inference routes, admin keys call everything.

With no keys configured the service is open; `service.__main__` only allows that on a loopback address.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .settings import ServiceSettings

_bearer = HTTPBearer(auto_error=False, description="an inference key or an admin key")


def _matches(key: str, keys: list[str]) -> bool:
    # Compare against every key so the time taken does not reveal which one (or whether any) matched.
    found = False
    for candidate in keys:
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


def _scope_of(request: Request, creds: HTTPAuthorizationCredentials | None) -> str:
    settings: ServiceSettings = request.app.state.settings
    if not settings.auth_enabled:
        return "admin"
    if creds is None or creds.scheme.lower() != "bearer":
        raise HTTPException(
            401, "missing bearer key: send 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"}
        )
    if _matches(creds.credentials, settings.admin_keys):
        return "admin"
    if _matches(creds.credentials, settings.api_keys):
        return "inference"
    raise HTTPException(401, "invalid bearer key", headers={"WWW-Authenticate": "Bearer"})


def require_inference(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    return _scope_of(request, creds)


def require_admin(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    scope = _scope_of(request, creds)
    if scope != "admin":
        raise HTTPException(403, "this key may call inference routes only; admin routes need an admin key")
    return scope


InferenceAuth = Depends(require_inference)
AdminAuth = Depends(require_admin)
