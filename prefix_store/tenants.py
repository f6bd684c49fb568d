"""API keys as data, shared by every replica: each key's record (scope, the tasks it sees, its limits, its
priority), the lookup of a bearer secret, revocation events, and the per-key rate counters.

  {N:keys}:records      hash: name -> record JSON (KeyRecord's fields plus "digest", the secret's SHA-256)
  {N:keys}:digests      hash: digest -> name
  {N:keys}:names        sorted set of names, all scored 0 (ZRANGEBYLEX pages through them in name order)
  {N:keys}:rate:k       hash: key k's charges per minute window w, fields "r<w>" (requests) and "t<w>" (tokens)
  N:key-events          pub/sub channel: {"type": "create" | "revoke", "name"} per key made or revoked

Everything shares the hash tag {N:keys} (keys.py), so creating a key (record, digest and name together, and the
event), revoking it (the three, its counters, and the event) and charging it are each one Lua script, atomic on one
server, behind Sentinel and on Redis Cluster alike. The secret is made here (`KEY_PREFIX` + 32 random bytes,
URL-safe) and leaves only once, in `create`'s answer: Redis holds its digest, which is what a bearer key is looked up
by.

Limits are a sliding-window counter over two fixed one-minute windows (as Cloudflare's): a key's use now is the
current window's count plus the previous window's count scaled by the share of it still inside the last minute.
`charge` checks both of a key's limits and, only if both allow the request, counts it in both: one script, so
replicas sharing the namespace share one limit exactly. Time is Redis's own (TIME), so replicas whose clocks
disagree still agree on the windows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from .errors import PrefixStoreError, StoreUnavailable
from .store import register_script, reply

if TYPE_CHECKING:
    from .store import PrefixStore

log = logging.getLogger(__name__)

KEY_PREFIX = "ps-"  # every stored key's secret starts with it: a bearer key without it is never looked up
SECRET_BYTES = 32
MAX_SECRET_CHARS = len(KEY_PREFIX) + 64  # token_urlsafe(32) is 43 characters; longer is not a stored key
MAX_KEYS = 10_000
MAX_GLOBS = 64
MAX_GLOB_CHARS = 128
MAX_RPM = 1_000_000
MAX_TPM = 1_000_000_000
WINDOW_MS = 60_000
Scope = Literal["inference", "admin", "metrics"]
Priority = Literal["high", "normal", "low"]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_GLOB = re.compile(r"[a-z0-9._\-*?\[\]!]+")  # task-name characters and fnmatch's
EXAMPLE: dict[str, Any] = {  # of a key spec, for the API documentation
    "name": "team-sentiment",
    "scope": "inference",
    "tasks": ["sent-*"],
    "requests_per_minute": 600,
    "tokens_per_minute": 200000,
    "priority": "normal",
}

_CREATE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then return -1 end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return -2 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
redis.call('PUBLISH', ARGV[5], cjson.encode({type='create', name=ARGV[1]}))
return 1
"""

_LOOKUP = """
local name = redis.call('HGET', KEYS[1], ARGV[1])
if not name then return false end
return redis.call('HGET', KEYS[2], name)
"""

_DELETE = """
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then return 0 end
redis.call('HDEL', KEYS[2], cjson.decode(record)['digest'])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[4])
redis.call('PUBLISH', ARGV[2], cjson.encode({type='revoke', name=ARGV[1]}))
return 1
"""

# The window maths `charge` and `over_limit` share. KEYS[1]: the key's rate hash; ARGV[4]: the window in ms.
# wait(kind, limit, cost): the milliseconds until a charge of `cost` against `limit` would pass if nothing else were
# charged (0: it would now; -1: never, the cost alone is over the limit).
_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local W = tonumber(ARGV[4])
local w = math.floor(now / W)
local elapsed = now - w * W
local function wait(kind, limit, cost)
  if cost > limit then return -1 end
  local prev = tonumber(redis.call('HGET', KEYS[1], kind .. (w - 1)) or '0')
  local cur = tonumber(redis.call('HGET', KEYS[1], kind .. w) or '0')
  local room = limit - cost - cur
  if room >= 0 then
    if prev * (W - elapsed) <= room * W then return 0 end
    return math.ceil(W - room * W / prev - elapsed)
  end
  return (W - elapsed) + math.ceil(W - (limit - cost) * W / cur)
end
"""

# ARGV: requests per minute ('' = none), tokens per minute ('' = none), the tokens this request charges, the window
# in ms. Returns {1, window} when charged, else {0, requests wait, tokens wait} (see wait).
_CHARGE = (
    _WINDOW
    + """
local rw, tw = 0, 0
if ARGV[1] ~= '' then rw = wait('r', tonumber(ARGV[1]), 1) end
if ARGV[2] ~= '' then tw = wait('t', tonumber(ARGV[2]), tonumber(ARGV[3])) end
if rw ~= 0 or tw ~= 0 then return {0, rw, tw} end
if ARGV[1] ~= '' then redis.call('HINCRBY', KEYS[1], 'r' .. w, 1) end
if ARGV[2] ~= '' then redis.call('HINCRBY', KEYS[1], 't' .. w, ARGV[3]) end
redis.call('HDEL', KEYS[1], 'r' .. (w - 2), 't' .. (w - 2))
redis.call('PEXPIRE', KEYS[1], 2 * W)
return {1, w}
"""
)

# Read-only: whether one more request of one token (the least any request charges) would pass both limits now, with
# the charge's own maths; writes nothing. ARGV as _CHARGE's (ARGV[3] unused). Returns {requests wait, tokens wait}.
_OVER = (
    _WINDOW
    + """
local rw, tw = 0, 0
if ARGV[1] ~= '' then rw = wait('r', tonumber(ARGV[1]), 1) end
if ARGV[2] ~= '' then tw = wait('t', tonumber(ARGV[2]), 1) end
return {rw, tw}
"""
)

# Takes a charge back (the request was refused after it was charged), from its window while that is still counted.
_REFUND = """
if redis.call('HEXISTS', KEYS[1], 'r' .. ARGV[1]) == 1 and ARGV[2] == '1' then
  redis.call('HINCRBY', KEYS[1], 'r' .. ARGV[1], -1)
end
if redis.call('HEXISTS', KEYS[1], 't' .. ARGV[1]) == 1 and tonumber(ARGV[3]) > 0 then
  redis.call('HINCRBY', KEYS[1], 't' .. ARGV[1], -tonumber(ARGV[3]))
end
return 1
"""


class KeyExists(PrefixStoreError):
    pass


class KeyNotFound(PrefixStoreError, LookupError):
    pass


class TooManyKeys(PrefixStoreError):
    pass


class InvalidKeyName(PrefixStoreError, ValueError):
    pass


def validate_key_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        shown = repr(name) if not isinstance(name, str) or len(name) <= 80 else f"{name[:80]!r}... ({len(name)} chars)"
        raise InvalidKeyName(
            f"invalid key name {shown}: expected 1 to 64 characters from letters, digits, '.', '_', '-', starting "
            "with a letter or digit"
        )
    return name


def digest(secret: str) -> str:
    """The SHA-256 (hex) a secret is stored and looked up by."""
    return hashlib.sha256(secret.encode()).hexdigest()


def could_be_stored(secret: str) -> bool:
    """Whether a bearer key has the shape of a stored key's secret (anything else is never looked up)."""
    return secret.startswith(KEY_PREFIX) and len(secret) <= MAX_SECRET_CHARS


class KeySpec(BaseModel):
    """What `POST /v1/keys` takes: a key's name, scope, visible tasks, limits and priority."""

    model_config = {"extra": "forbid", "json_schema_extra": {"examples": [EXAMPLE]}}

    name: str = Field(
        description="1 to 64 letters, digits, '.', '_', '-' (starting with a letter or digit); unique",
        examples=["team-sentiment"],
    )
    scope: Scope = Field(
        "inference",
        description="inference: the inference routes; admin: every route; metrics: GET /metrics only",
    )
    tasks: list[str] = Field(
        default_factory=lambda: ["*"],
        min_length=1,
        max_length=MAX_GLOBS,
        description="globs (fnmatch: *, ?, [...]) over task names: the tasks the key sees; any other task answers "
        "404 as an unknown one does. The bare backbone ('base') is visible to every key. Admin and metrics keys see "
        "every task (['*'])",
        examples=[["sent-*", "qa"]],
    )
    requests_per_minute: int | None = Field(
        None, ge=1, le=MAX_RPM, description="most inference requests in any 60 s (sliding window); none: unlimited"
    )
    tokens_per_minute: int | None = Field(
        None,
        ge=1,
        le=MAX_TPM,
        description="most tokens charged in any 60 s: prompt tokens + max new tokens x n per prompt (generation), "
        "prompt tokens (classification, embeddings), one per image; none: unlimited",
    )
    priority: Priority = Field(
        "normal", description="admission class: every queued high request is admitted before normal, then low"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        try:
            return validate_key_name(value)
        except InvalidKeyName as e:
            raise ValueError(str(e)) from None

    @field_validator("tasks")
    @classmethod
    def _globs(cls, value: list[str]) -> list[str]:
        for i, glob in enumerate(value):
            if not 1 <= len(glob) <= MAX_GLOB_CHARS or not _GLOB.fullmatch(glob):
                raise ValueError(
                    f"tasks[{i}] {glob[:MAX_GLOB_CHARS]!r}: expected a glob of 1 to {MAX_GLOB_CHARS} characters from "
                    "lower-case letters, digits, '.', '_', '-' and the wildcards '*', '?', '[...]'"
                )
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _scoped(self) -> KeySpec:
        if self.scope != "inference" and self.tasks != ["*"]:
            raise ValueError(
                f"tasks: an {self.scope} key sees every task (an admin key can make any key; a metrics key calls "
                f"no task); expected ['*'] or nothing, got {self.tasks}"
            )
        if self.scope == "metrics" and (self.requests_per_minute or self.tokens_per_minute):
            raise ValueError("requests_per_minute, tokens_per_minute: limits count inference; a metrics key has none")
        return self


class KeyRecord(KeySpec):
    """A stored key, as listed: its spec and when it was made; never its secret."""

    model_config = {
        "extra": "forbid",
        "json_schema_extra": {"examples": [{**EXAMPLE, "created_at": "2026-11-26T09:00:00+00:00"}]},
    }

    created_at: str = Field(description="ISO 8601, UTC", examples=["2026-11-26T09:00:00+00:00"])


@dataclass(frozen=True)
class Charge:
    """The outcome of `KeyStore.charge`. Charged: `window` is where (for `refund`). Refused: `limit` names the first
    limit in the way ("requests_per_minute" or "tokens_per_minute"), `retry_after_ms` when the request would pass
    if nothing else were charged, or None when it never can (the request alone is over the limit)."""

    charged: bool
    window: int = 0
    limit: str = ""
    retry_after_ms: int | None = None


@dataclass(frozen=True)
class KeyEvent:
    type: str  # "create" or "revoke"
    name: str


class KeyStore:
    """API keys in the prefix store's Redis (see the module docstring): on its client, with its read retries, its
    replica acknowledgement of writes (PREFIXSERVE_REDIS_MIN_REPLICAS: a failover cannot bring a revoked key back)
    and its way of subscribing on a cluster."""

    def __init__(self, store: PrefixStore, *, max_keys: int = MAX_KEYS) -> None:
        self.store = store
        self.keys = store.keys
        self.max_keys = max_keys
        client = store.client
        self._create = register_script(client, _CREATE)
        self._lookup = register_script(client, _LOOKUP)
        self._delete = register_script(client, _DELETE)
        self._charge = register_script(client, _CHARGE)
        self._over = register_script(client, _OVER)
        self._refund = register_script(client, _REFUND)

    @property
    def channel(self) -> str:
        return self.keys.key_channel

    async def create(self, spec: KeySpec) -> tuple[KeyRecord, str]:
        """Stores a new key and returns its record and its secret (which nothing keeps: shown once). Raises KeyExists
        for a name in use, TooManyKeys past max_keys."""
        secret = KEY_PREFIX + secrets.token_urlsafe(SECRET_BYTES)
        d = digest(secret)
        record = KeyRecord(**spec.model_dump(), created_at=datetime.now(UTC).isoformat(timespec="seconds"))
        stored = json.dumps({**record.model_dump(), "digest": d})
        k = self.keys
        keys = [k.key_records, k.key_digests, k.key_names]
        rc = await self.store._write(self._create, keys, [spec.name, d, stored, self.max_keys, self.channel])
        if rc == 0:
            raise KeyExists(f"key {spec.name!r} exists: delete it first, or pick another name")
        if rc == -1:
            raise TooManyKeys(f"{self.max_keys} keys exist, the most this server keeps: delete unused keys first")
        if rc == -2:  # two secrets with one SHA-256: not in this universe, but never let one key answer for another
            raise StoreUnavailable("a freshly made secret collided with a stored one: try again")
        log.info("created API key %r (scope %s)", spec.name, spec.scope)
        return record, secret

    async def get(self, name: str) -> KeyRecord:
        validate_key_name(name)
        raw: bytes | None = await self.store._read(lambda: reply(self.store.client.hget(self.keys.key_records, name)))
        if raw is None:
            raise KeyNotFound(f"key {name!r} not found")
        return _record(raw)

    async def list_keys(self, *, after: str | None = None, limit: int = 100) -> list[KeyRecord]:
        """Up to `limit` records in name order, from the first name after `after` (a page's last name)."""
        return (await self.page_keys(after=after, limit=limit))[0]

    async def page_keys(self, *, after: str | None = None, limit: int = 100) -> tuple[list[KeyRecord], str | None]:
        """A page of `list_keys` and the `after` of the next one (None: this was the last). The next page starts
        after the last name the range returned, whether or not its record was still there when read: a key revoked
        between the range and the read of the records shortens this page, never the listing."""
        start = "-" if after is None else "(" + validate_key_name(after)
        k = self.keys

        async def page() -> tuple[list[bytes], list[bytes | None]]:
            client = self.store.client
            names: list[bytes] = await reply(client.zrangebylex(k.key_names, start, "+", start=0, num=limit))
            if not names:
                return [], []
            records: list[bytes | None] = await reply(client.hmget(k.key_records, names))
            return names, records

        names, records = await self.store._read(page)
        following = names[-1].decode() if len(names) == limit else None
        return [_record(raw) for raw in records if raw is not None], following

    async def lookup(self, secret: str) -> KeyRecord | None:
        """The record of the key whose secret this is; None when no stored key has it. Raises StoreUnavailable."""
        if not could_be_stored(secret):
            return None
        k = self.keys
        raw = await self.store._read(lambda: self._lookup(keys=[k.key_digests, k.key_records], args=[digest(secret)]))
        return None if raw is None else _record(raw)

    async def delete(self, name: str) -> None:
        """Revokes a key: its record, its digest and its counters go in one script, which announces it on the key
        channel for every replica to drop it from its cache."""
        validate_key_name(name)
        k = self.keys
        keys = [k.key_records, k.key_digests, k.key_names, k.key_rate(name)]
        if not await self.store._write(self._delete, keys, [name, self.channel]):
            raise KeyNotFound(f"key {name!r} not found")
        log.info("revoked API key %r", name)

    async def charge(
        self, name: str, *, requests_per_minute: int | None, tokens_per_minute: int | None, tokens: int
    ) -> Charge:
        """Counts one request of `tokens` tokens against the key's limits, or refuses it (counting nothing) when
        either limit would be passed. Not acknowledged by replicas (a counter lost in a failover only forgives a
        minute's use) and never repeated."""
        args = [
            "" if requests_per_minute is None else requests_per_minute,
            "" if tokens_per_minute is None else tokens_per_minute,
            tokens,
            WINDOW_MS,
        ]
        res = await self.store._write_unacked(self._charge(keys=[self.keys.key_rate(name)], args=args))
        if int(res[0]) == 1:
            return Charge(True, window=int(res[1]))
        return _refusal(int(res[1]), int(res[2]))

    async def over_limit(
        self, name: str, *, requests_per_minute: int | None, tokens_per_minute: int | None
    ) -> Charge | None:
        """Reads, without counting anything, whether the key is already past a limit: over its requests per minute
        (one more request would not pass) or at its tokens per minute (one more token would not). The refusal
        `charge` would give any request then (every request charges one request and at least one token), or None.
        A cheap check before a request's work; `charge` stays the one that counts."""
        args = [
            "" if requests_per_minute is None else requests_per_minute,
            "" if tokens_per_minute is None else tokens_per_minute,
            0,
            WINDOW_MS,
        ]
        res = await self.store._read(lambda: self._over(keys=[self.keys.key_rate(name)], args=args))
        if int(res[0]) == 0 and int(res[1]) == 0:
            return None
        return _refusal(int(res[0]), int(res[1]))

    async def refund(self, name: str, charge: Charge, *, tokens: int, request: bool = True) -> None:
        """Takes back a charge of a request that was then refused (e.g. the queue was full)."""
        args = [charge.window, int(request), tokens]
        await self.store._write_unacked(self._refund(keys=[self.keys.key_rate(name)], args=args))

    async def events(self, on_subscribed: Callable[[], None] | None = None) -> AsyncIterator[KeyEvent]:
        """Yields key events (creations, revocations) until cancelled; `on_subscribed` runs once the subscription is
        live. Raises StoreUnavailable when it drops (pub/sub does not replay: a subscriber should then forget what
        it cached)."""
        async for data in self.store.subscribe(self.channel, "key", on_subscribed):
            try:
                yield KeyEvent(**data)
            except TypeError:
                log.warning("ignoring malformed key event %r", data)


def _refusal(requests_wait: int, tokens_wait: int) -> Charge:
    """A refused charge from the script's waits (see wait in _WINDOW): the limit that never passes, else the one
    that passes last."""
    waits = {"requests_per_minute": requests_wait, "tokens_per_minute": tokens_wait}
    never = [lim for lim, ms in waits.items() if ms < 0]
    if never:
        return Charge(False, limit=never[0])
    limit = max(waits, key=lambda lim: waits[lim])
    return Charge(False, limit=limit, retry_after_ms=waits[limit])


def _record(raw: bytes) -> KeyRecord:
    # Only the fields this release knows: a record written by a newer one (during a rolling upgrade) still reads.
    fields = json.loads(raw)
    return KeyRecord(**{name: value for name, value in fields.items() if name in KeyRecord.model_fields})
