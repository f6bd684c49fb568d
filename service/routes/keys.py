"""Admin routes over the stored API keys (prefix_store.tenants): create (the secret shown once), list, inspect,
revoke. A key made here works on every replica sharing the namespace at once; a revoked one stops within a second
(auth.KeyRing follows the creations and revocations). See the README's "Keys, scopes and limits"."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, Field

from prefix_store import StoreUnavailable
from prefix_store.tenants import EXAMPLE, KeyRecord, KeySpec, KeyStore

from ..auth import AdminAuth, KeyRing
from ..schemas import ErrorBody

router = APIRouter(prefix="/v1/keys", tags=["keys (admin)"], dependencies=[AdminAuth])
KeyName = Annotated[str, Path(description="the key's name", examples=["team-sentiment"])]
_EXAMPLE = {**EXAMPLE, "created_at": "2026-11-26T09:00:00+00:00"}


class KeyCreated(KeyRecord):
    key: str = Field(
        description="the secret, for `Authorization: Bearer <key>`: shown this once, stored only as its SHA-256",
        examples=["ps-8mQk3vJx0d2W9yR1cT5bN7aL4eH6gF0sZ2uV8iO3pXw"],
    )

    model_config = {
        "extra": "forbid",
        "json_schema_extra": {"examples": [{**_EXAMPLE, "key": "ps-8mQk3vJx0d2W9yR1cT5bN7aL4eH6gF0sZ2uV8iO3pXw"}]},
    }


class KeyList(BaseModel):
    keys: list[KeyRecord] = Field(description="in name order, without secrets")
    next: str | None = Field(
        description="pass as `after` for the next page; null: this was the last (a page may hold fewer than `limit` "
        "keys, one revoked while it was read: only a null `next` ends the listing)"
    )

    model_config = {"json_schema_extra": {"examples": [{"keys": [_EXAMPLE], "next": None}]}}


ERRORS = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "invalid key name",
        401: "missing or invalid key",
        403: "not an admin key",
        404: "no key of that name",
        409: "the name is taken, or the server holds the most keys it keeps",
        422: "invalid body",
        503: "Redis unreachable",
    }.items()
}


def _keys(request: Request) -> KeyStore:
    ring: KeyRing = request.app.state.keys
    if ring.store is None:
        raise StoreUnavailable("the key store is not open yet: the service is starting")
    return ring.store


KeysDep = Annotated[KeyStore, Depends(_keys)]


@router.post("", status_code=201, response_model=KeyCreated, responses=ERRORS, summary="Create a key")
async def create_key(spec: KeySpec, keys: KeysDep, request: Request) -> KeyCreated:
    """Makes the key's secret (`ps-` + 32 random bytes) and stores its record and the secret's SHA-256 in one atomic
    script (a name in use is a 409), which announces it: every replica forgets the keys it knows to be unknown, this
    one at once. The answer is the only place the secret ever appears."""
    record, secret = await keys.create(spec)
    ring: KeyRing = request.app.state.keys
    ring.created()
    return KeyCreated(**record.model_dump(), key=secret)


@router.get("", response_model=KeyList, responses=ERRORS, summary="List keys (no secrets)")
async def list_keys(
    keys: KeysDep,
    after: Annotated[str | None, Query(description="list names after this one (a page's `next`)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="most keys in the page")] = 100,
) -> KeyList:
    page, following = await keys.page_keys(after=after, limit=limit)  # `next` from the names, not the records read
    return KeyList(keys=page, next=following)


@router.get("/{name}", response_model=KeyRecord, responses=ERRORS, summary="One key (no secret)")
async def get_key(name: KeyName, keys: KeysDep) -> KeyRecord:
    return await keys.get(name)


@router.delete("/{name}", status_code=204, responses=ERRORS, summary="Revoke a key")
async def delete_key(name: KeyName, keys: KeysDep, request: Request) -> Response:
    """Deletes the key and announces it: every replica drops it from its cache within a second, this one at once."""
    await keys.delete(name)
    ring: KeyRing = request.app.state.keys
    ring.forget(name)
    return Response(status_code=204)
