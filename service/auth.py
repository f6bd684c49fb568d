"""Bearer-key auth: who sent a request (a Principal), which routes it may call (its scope), which tasks it sees, and
its limits and priority.

Keys come from two places. The environment: PREFIXSERVE_ADMIN_KEYS (scope admin) and PREFIXSERVE_API_KEYS (scope
inference), every task, no limits, normal priority, checked first, in constant time and without Redis. And Redis
(prefix_store.tenants, made with POST /v1/keys): scope, task globs, limits and priority, shared by every replica,
looked up by the SHA-256 of the bearer key. Auth is on when the environment holds at least one key; with none the
service is open (everything is admin, every task, no limits) and `service.__main__` only allows that on a loopback
address, so stored keys take effect on replicas with auth on.

Scopes: admin calls everything; inference the inference routes; metrics GET /metrics only. The open paths need no
key.

A stored key's principal is cached in the process (`KeyRing`), bounded, for at most CACHE_TTL_S; a revocation is
published on the key channel and drops it on every replica at once (the TTL only covers a lost subscription). An
unknown key (the shape of a stored one, no record) is remembered too, so a client repeating a made-up `ps-` key
costs Redis one lookup a second, not one a request: its digest, bounded (UNKNOWN_ENTRIES), for UNKNOWN_TTL_S. Every
key made is published on the same channel, and each replica forgets its unknown keys when it hears it, so a key
made on one replica works on every other at once (the TTL covers a lost subscription).

The key is checked by `service.guard.RequestGuard` from the request head, before any byte of the body is read; the
guard puts the Principal in `request.state.principal` and the `principal` context variable. The route dependencies
below declare the scheme in the OpenAPI document and check the guard's principal against the route's scope.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from prefix_store import StoreUnavailable, TaskNotFound
from prefix_store.tenants import KeyRecord, KeyStore, could_be_stored, digest

from .schemas import BASE_TASK
from .settings import ServiceSettings

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="an inference, metrics or admin key")

OPEN_PATHS = frozenset({"/health", "/ready", "/docs", "/openapi.json"})
DOCS_ASSETS = "/docs/assets/"  # Swagger UI's script, style and icon (service/routes/docs.py): open like /docs
ADMIN_PREFIXES = ("/v1/tasks", "/v1/train", "/v1/keys", "/ui/api")
UI_PATHS = ("/ui", "/ui/")  # the operator's console (service/routes/ui.py): open, its data comes from /ui/api, /v1
UI_ASSETS = "/ui/static/"  # its scripts and style sheet: open like the page
METRICS_PATH = "/metrics"
CACHE_TTL_S = 5.0  # the longest a stored key's principal is trusted without Redis, should a revocation be missed
CACHE_ENTRIES = 10_000
UNKNOWN_TTL_S = 1.0  # the longest an unknown key is refused without asking Redis again, should a creation be missed
UNKNOWN_ENTRIES = 10_000


@dataclass(frozen=True)
class Principal:
    """Who a request comes from. name: the stored key's name ("env:admin" / "env:inference" for environment keys,
    "" on an open server); tasks: fnmatch globs over task names; client: the unit of fairness within a task
    (client_id)."""

    name: str
    scope: str
    tasks: tuple[str, ...] = ("*",)
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    priority: str = "normal"
    client: str = ""

    @property
    def limited(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None

    def sees(self, name: str) -> bool:
        """Whether the task a request names (a version pin `task@N` included) is visible to this key; the bare
        backbone is visible to every key."""
        task = task_name(name)
        return self.tasks == ("*",) or task == BASE_TASK or any(fnmatchcase(task, glob) for glob in self.tasks)


OPEN = Principal("", "admin")  # an open server's (no keys configured): everything
ANONYMOUS = Principal("", "", tasks=())  # no valid key, on an open path: nothing


def task_name(name: str) -> str:
    """The task part of a name a request gives: `task@N` pins version N of `task`."""
    return name.partition("@")[0]


def required_scope(path: str) -> str | None:
    """The scope a path needs: None (open), "inference", "metrics" or "admin". Paths nobody routes need a key too,
    so an anonymous client learns nothing from them."""
    if path in OPEN_PATHS or path.startswith(DOCS_ASSETS):
        return None
    if path == METRICS_PATH or path.startswith(METRICS_PATH + "/"):
        return "metrics"
    if any(path == p or path.startswith(p + "/") for p in ADMIN_PREFIXES):
        return "admin"
    if path in UI_PATHS or path.startswith(UI_ASSETS):  # the console's page and assets hold no data
        return None
    return "inference"


def require(scope: str | None, granted: str) -> None:
    """Raises 403 when a key's granted scope does not cover the scope a route needs (admin covers every scope)."""
    if scope is None or granted == "admin" or scope == granted:
        return
    if granted == "inference":
        needs = "/metrics needs a metrics or admin key" if scope == "metrics" else "admin routes need an admin key"
        raise HTTPException(403, f"this key may call inference routes only; {needs}")
    needs = (
        "inference routes need an inference or admin key" if scope == "inference" else "admin routes need an admin key"
    )
    raise HTTPException(403, f"this key may read /metrics only; {needs}")


def _matches(key: str, keys: list[str]) -> bool:
    # Compare against every key so the time taken does not reveal which one (or whether any) matched.
    found = False
    for candidate in keys:
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


def _bearer_key(authorization: str | None) -> str:
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise HTTPException(
            401, "missing bearer key: send 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"}
        )
    return key.strip()


def _invalid() -> HTTPException:
    return HTTPException(401, "invalid bearer key", headers={"WWW-Authenticate": "Bearer"})


def _env_principal(key: str, settings: ServiceSettings) -> Principal | None:
    if _matches(key, settings.admin_keys):
        return Principal("env:admin", "admin", client=client_id(key))
    if _matches(key, settings.api_keys):
        return Principal("env:inference", "inference", client=client_id(key))
    return None


def env_principal(authorization: str | None, settings: ServiceSettings) -> Principal:
    """The principal of an environment key (no Redis): for an app whose guard did not resolve the request. Raises
    HTTPException 401 for any other key."""
    if not settings.auth_enabled:
        return OPEN
    found = _env_principal(_bearer_key(authorization), settings)
    if found is None:
        raise _invalid()
    return found


class KeyRing:
    """Resolves a request's Authorization header to its Principal: environment keys, then stored keys through a
    bounded cache that revocation events empty (see the module docstring). `start` attaches the key store (the app's
    lifespan); until then only environment keys resolve."""

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        ttl_s: float = CACHE_TTL_S,
        entries: int = CACHE_ENTRIES,
        unknown_ttl_s: float = UNKNOWN_TTL_S,
        unknown_entries: int = UNKNOWN_ENTRIES,
    ) -> None:
        self.settings = settings
        self.store: KeyStore | None = None
        self.ttl_s = ttl_s
        self.entries = entries
        self.unknown_ttl_s = unknown_ttl_s
        self.unknown_entries = unknown_entries
        self.subscribed = asyncio.Event()
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()  # digest -> (principal, expiry)
        self._unknown: OrderedDict[str, float] = OrderedDict()  # digest of a key with no record -> expiry
        # Bumped whenever entries are dropped or a key is made: a lookup that started before cannot cache what it
        # read (it may be a key revoked, or made, meanwhile).
        self._generation = 0
        self._listener: asyncio.Task[None] | None = None

    async def start(self, store: KeyStore) -> None:
        self.store = store
        self._listener = asyncio.create_task(self._listen(), name="key-events")

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None

    async def resolve(self, authorization: str | None) -> Principal:
        """The request's principal. Raises HTTPException 401 without a valid key, StoreUnavailable when Redis cannot
        say whether a stored key is valid."""
        settings = self.settings
        if not settings.auth_enabled:
            return OPEN
        key = _bearer_key(authorization)
        found = _env_principal(key, settings)
        if found is not None:
            return found
        if self.store is None or not could_be_stored(key):
            raise _invalid()
        d = digest(key)
        now = time.monotonic()
        hit = self._cache.get(d)
        if hit is not None and hit[1] > now:
            self._cache.move_to_end(d)
            return hit[0]
        if self._unknown.get(d, 0.0) > now:
            raise _invalid()
        generation = self._generation
        record = await self.store.lookup(key)
        if record is None:
            self._cache.pop(d, None)
            if generation == self._generation:
                self._unknown[d] = time.monotonic() + self.unknown_ttl_s
                self._unknown.move_to_end(d)
                while len(self._unknown) > self.unknown_entries:
                    self._unknown.popitem(last=False)
            raise _invalid()
        self._unknown.pop(d, None)
        found = _stored_principal(record, client_id(key))
        if generation == self._generation:
            self._cache[d] = (found, time.monotonic() + self.ttl_s)
            self._cache.move_to_end(d)
            while len(self._cache) > self.entries:
                self._cache.popitem(last=False)
        return found

    async def peek(self, authorization: str | None) -> Principal | None:
        """The principal when the request carries a valid key, else None (open paths: details for admin keys only)."""
        if authorization is None and self.settings.auth_enabled:
            return None
        try:
            return await self.resolve(authorization)
        except (HTTPException, StoreUnavailable):
            return None

    def forget(self, name: str | None = None) -> None:
        """Drops the cached principal of the key `name`, or every one (and every unknown key)."""
        self._generation += 1
        if name is None:
            self._cache.clear()
            self._unknown.clear()
            return
        for d in [d for d, (p, _) in self._cache.items() if p.name == name]:
            del self._cache[d]

    def created(self) -> None:
        """A key was made (here or on another replica): no key is known to be unknown any more (the new key's digest
        may be among them; which one is not published)."""
        self._generation += 1
        self._unknown.clear()

    async def _listen(self) -> None:
        """Follows creations and revocations for as long as the app runs; while the subscription is down nothing is
        known about them, so the caches are emptied when it drops and again once it is back."""
        assert self.store is not None
        delay = 0.1
        while True:
            try:
                async for event in self.store.events(on_subscribed=self._on_subscribed):
                    if event.type == "revoke":
                        self.forget(event.name)
                    elif event.type == "create":
                        self.created()
                    delay = 0.1
            except StoreUnavailable as e:
                log.warning("API key events: %s; subscribing again in %.1fs", e, delay)
            self.subscribed.clear()
            self.forget()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _on_subscribed(self) -> None:
        self.forget()
        self.subscribed.set()


def _stored_principal(record: KeyRecord, client: str) -> Principal:
    return Principal(
        record.name,
        record.scope,
        tuple(record.tasks),
        record.requests_per_minute,
        record.tokens_per_minute,
        record.priority,
        client,
    )


# Who sent the request being handled, set by the guard from the bearer key: its principal, and its client (the unit
# of fairness within a task). Outside a request (or without the guard): everything, unnamed.
principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal", default=OPEN)
client: contextvars.ContextVar[str] = contextvars.ContextVar("client", default="")


def client_id(key: str) -> str:
    """A stable, non-secret name for a bearer key ("key:" + the start of its SHA-256). The key itself never leaves
    this function."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


def check_task(name: str) -> None:
    """Raises TaskNotFound, worded as for a task that does not exist, when the request's key does not see the task
    `name` (so a key cannot learn which other tasks exist)."""
    if not principal.get().sees(name):
        raise TaskNotFound(f"task {task_name(name)!r} not found")


def principal_of(request: Request) -> Principal:
    """The principal the guard resolved; an app without the guard resolves environment keys only."""
    found = getattr(request.state, "principal", None)
    if isinstance(found, Principal):
        return found
    return env_principal(request.headers.get("authorization"), request.app.state.settings)


def _check(request: Request, needed: str) -> str:
    granted = principal_of(request).scope
    require(needed, granted)
    return granted


def require_inference(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    return _check(request, "inference")


def require_metrics(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    return _check(request, "metrics")


def require_admin(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    return _check(request, "admin")


def is_admin(request: Request) -> bool:
    """Whether the request carries an admin key (or auth is off): open routes show details only then."""
    try:
        return principal_of(request).scope == "admin"
    except HTTPException:
        return False


InferenceAuth = Depends(require_inference)
MetricsAuth = Depends(require_metrics)
AdminAuth = Depends(require_admin)
