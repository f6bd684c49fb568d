"""The Redis prefix store: immutable task versions, an atomic "current" pointer, and change events.

Keys, under a namespace N:
  N:tasks                 set of task names that have at least one version
  N:task:{t}              hash: current (served version), latest (highest committed version)
  N:task:{t}:versions     sorted set of stored version numbers
  N:task:{t}:v:{n}        hash: meta (summary JSON, for listings), blob (the encoded artifact)
  N:task:{t}:seq          version counter; it survives deleting the task, so a (task, version) pair is never
                          reused and caches keyed by it can never serve stale tensors
  N:events                pub/sub channel: one JSON event per publish, delete and rollback

A publish reserves a version with INCR, encodes the artifact with that number inside it, then one Lua script
writes the version and moves `current` to it only if no higher version was committed meanwhile. Lua scripts run
atomically, so a reader (also a script) sees either the old or the new version, never half of one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from .artifact import PrefixArtifact, validate_task_name
from .codec import DEFAULT_MAX_BYTES, decode, encode
from .embedded import EmbeddedRedis
from .errors import (
    ArtifactError,
    ArtifactTooLarge,
    StoredArtifactCorrupt,
    StoreUnavailable,
    TaskNotFound,
    VersionConflict,
    VersionNotFound,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_COMMIT = """
redis.call('HSET', KEYS[2], 'meta', ARGV[3], 'blob', ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[1])
local v = tonumber(ARGV[2])
local latest = tonumber(redis.call('HGET', KEYS[1], 'latest') or '0')
if v > latest then
  redis.call('HSET', KEYS[1], 'latest', v, 'current', v)
end
local current = tonumber(redis.call('HGET', KEYS[1], 'current'))
redis.call('PUBLISH', ARGV[5], cjson.encode({type='publish', task=ARGV[1], version=v, current=current}))
return current
"""

_GET = """
local v = ARGV[2]
if v == '' then
  v = redis.call('HGET', KEYS[1], 'current')
  if not v then return nil end
end
local data = redis.call('HGET', ARGV[1] .. v, ARGV[3])
if not data then return {tonumber(v)} end
return {tonumber(v), data}
"""

_DELETE_TASK = """
local versions = redis.call('ZRANGE', KEYS[2], 0, -1)
if redis.call('EXISTS', KEYS[1]) == 0 and #versions == 0 then return 0 end
for _, v in ipairs(versions) do redis.call('DEL', ARGV[2] .. v) end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('PUBLISH', ARGV[3], cjson.encode({type='delete', task=ARGV[1]}))
return #versions
"""

_DELETE_VERSION = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -3 end
if redis.call('EXISTS', KEYS[3]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'current') == ARGV[2] then return -2 end
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[2], ARGV[2])
local current = tonumber(redis.call('HGET', KEYS[1], 'current'))
redis.call('PUBLISH', ARGV[3], cjson.encode({type='delete_version', task=ARGV[1], version=tonumber(ARGV[2]),
  current=current}))
return 1
"""

_ROLLBACK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -3 end
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
redis.call('HSET', KEYS[1], 'current', ARGV[2])
redis.call('PUBLISH', ARGV[3], cjson.encode({type='rollback', task=ARGV[1], version=tonumber(ARGV[2]),
  current=tonumber(ARGV[2])}))
return 1
"""


@dataclass(frozen=True)
class StoreEvent:
    """A change announced on the events channel. `version` is the version the event is about."""

    type: str  # "publish" | "delete" | "delete_version" | "rollback"
    task: str
    version: int | None = None
    current: int | None = None  # the task's current version after the change; None once the task is deleted


@dataclass(frozen=True)
class TaskInfo:
    name: str
    current: int
    versions: list[int]
    summary: dict[str, Any]  # PrefixArtifact.summary() of the current version


SENTINEL_SCHEME = "redis+sentinel://"


def connect(url: str, *, socket_timeout: float = 5.0) -> aioredis.Redis:
    """A client for tensor blobs: bytes responses, and no automatic retries, since the store decides which
    commands are safe to repeat (reads are; a publish's INCR is not).

    `redis://` / `rediss://` / `unix://`: one server. `redis+sentinel://[:password@]host:port[,host:port...]/service
    [/db]`: the master Sentinel names for `service`, found again after a failover (each new connection asks)."""
    options: dict[str, Any] = {
        "decode_responses": False,
        "retry": Retry(NoBackoff(), 0),
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
    }
    if not url.startswith(SENTINEL_SCHEME):
        return aioredis.Redis.from_url(url, **options)
    from redis.asyncio.sentinel import Sentinel

    sentinels, service, db, password = parse_sentinel_url(url)
    sentinel = Sentinel(
        sentinels, sentinel_kwargs={"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout}
    )
    return sentinel.master_for(service, db=db, password=password, **options)


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int, str | None]:
    """(sentinel addresses, service name, db, password) of a redis+sentinel:// URL."""
    rest = url[len(SENTINEL_SCHEME) :]
    password = None
    if "@" in rest:
        auth, rest = rest.rsplit("@", 1)
        password = auth.split(":", 1)[-1] or None
    hosts, _, path = rest.partition("/")
    parts = [p for p in path.split("/") if p]
    if not hosts or not parts:
        raise ValueError(f"{url!r}: expected redis+sentinel://host:port[,host:port]/service[/db]")
    sentinels = []
    for h in hosts.split(","):
        host, sep, port = h.rpartition(":")
        sentinels.append((host, int(port)) if sep else (h, 26379))
    return sentinels, parts[0], int(parts[1]) if len(parts) > 1 else 0, password


def open_store(
    redis_url: str | None,
    data_dir: str | Path,
    *,
    namespace: str = "prefixserve",
    max_artifact_bytes: int = DEFAULT_MAX_BYTES,
    min_replicas: int = 0,
) -> tuple[PrefixStore, EmbeddedRedis | None]:
    """A store on `redis_url`, or, when it is None, on an embedded Redis under `data_dir` (returned too, for the
    caller to stop after closing the store). Call it from the main thread: see EmbeddedRedis.start."""
    embedded = None
    if redis_url is None:
        embedded = EmbeddedRedis(data_dir)
        redis_url = embedded.start()
    store = PrefixStore(
        connect(redis_url), namespace=namespace, max_artifact_bytes=max_artifact_bytes, min_replicas=min_replicas
    )
    return store, embedded


class PrefixStore:
    """Versioned prefix artifacts in Redis.

    Args:
        client: a `redis.asyncio.Redis` made with `connect` (bytes responses).
        namespace: key prefix, so several deployments or test runs can share one server.
        max_artifact_bytes: the size cap applied when writing and when decoding.
        read_retries / retry_backoff_s: reads are retried with exponential backoff on connection faults.
        min_replicas: a write is acknowledged only once this many replicas have it (Redis WAIT), so a failover to
            one of them (Sentinel) cannot lose an acknowledged version; 0: the master's word is enough.
        replica_wait_s: how long a write waits for them before it is reported unacknowledged (StoreUnavailable).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        namespace: str = "prefixserve",
        max_artifact_bytes: int = DEFAULT_MAX_BYTES,
        read_retries: int = 3,
        retry_backoff_s: float = 0.05,
        min_replicas: int = 0,
        replica_wait_s: float = 2.0,
    ) -> None:
        self.client = client
        self.min_replicas = min_replicas
        self.replica_wait_s = replica_wait_s
        self.ns = namespace
        self.channel = f"{namespace}:events"
        self.max_artifact_bytes = max_artifact_bytes
        self._read_retries = read_retries
        self.decode_failures = 0  # stored records that failed to decode (a server-side fault; see get)
        self._backoff = retry_backoff_s
        self._commit = client.register_script(_COMMIT)
        self._get = client.register_script(_GET)
        self._delete_task = client.register_script(_DELETE_TASK)
        self._delete_version = client.register_script(_DELETE_VERSION)
        self._rollback = client.register_script(_ROLLBACK)

    # -- keys -----------------------------------------------------------------------------------------------------
    def _task_key(self, task: str) -> str:
        return f"{self.ns}:task:{task}"

    def _version_prefix(self, task: str) -> str:
        return f"{self.ns}:task:{task}:v:"

    # -- writes ---------------------------------------------------------------------------------------------------
    async def put(self, artifact: PrefixArtifact) -> PrefixArtifact:
        """Stores `artifact` as the task's next version and makes it current. Returns it with its version set.

        A version number given on the artifact is ignored: numbers are assigned here, per task, increasing.
        """
        if artifact.nbytes > self.max_artifact_bytes:
            limit = self.max_artifact_bytes
            raise ArtifactTooLarge(f"prefix tensors are {artifact.nbytes} bytes: the limit is {limit}")
        task = artifact.task
        tk = self._task_key(task)
        version = int(await self._write(self.client.incr(f"{tk}:seq"), replicate=False))  # the commit waits
        created = artifact.created_at or datetime.now(UTC).isoformat(timespec="seconds")
        stamped = dataclasses.replace(artifact, version=version, created_at=created)
        blob = encode(stamped)
        if len(blob) > self.max_artifact_bytes:
            raise ArtifactTooLarge(f"encoded artifact is {len(blob)} bytes: the limit is {self.max_artifact_bytes}")
        meta = json.dumps({**stamped.summary(), "encoded_bytes": len(blob)})
        keys = [tk, f"{self._version_prefix(task)}{version}", f"{tk}:versions", f"{self.ns}:tasks"]
        await self._write(self._commit(keys=keys, args=[task, version, meta, blob, self.channel]))
        log.info("published %s v%d (%d bytes)", task, version, len(blob))
        return stamped

    async def put_bytes(self, data: bytes, *, task: str | None = None) -> PrefixArtifact:
        """Decodes (and so fully validates) an encoded artifact, then publishes it, optionally under another name."""
        artifact = decode(data, max_bytes=self.max_artifact_bytes)
        return await self.put(artifact if task is None else artifact.with_task(task))

    async def delete(self, task: str, version: int | None = None) -> None:
        """Deletes a whole task, or one version of it that is not the current one."""
        validate_task_name(task)
        tk = self._task_key(task)
        if version is None:
            n = await self._write(
                self._delete_task(
                    keys=[tk, f"{tk}:versions", f"{self.ns}:tasks"],
                    args=[task, self._version_prefix(task), self.channel],
                )
            )
            if n == 0:
                raise TaskNotFound(f"task {task!r} not found")
            return
        keys = [tk, f"{tk}:versions", f"{self._version_prefix(task)}{version}"]
        rc = await self._write(self._delete_version(keys=keys, args=[task, version, self.channel]))
        if rc == -2:
            raise VersionConflict(
                f"version {version} is the current version of {task!r}: roll back to another version first, "
                "or delete the task"
            )
        self._raise_missing(rc, task, version)

    async def rollback(self, task: str, version: int) -> None:
        """Makes an existing older (or newer) version current again. Later publishes still get fresh numbers."""
        validate_task_name(task)
        tk = self._task_key(task)
        rc = await self._write(
            self._rollback(keys=[tk, f"{self._version_prefix(task)}{version}"], args=[task, version, self.channel])
        )
        self._raise_missing(rc, task, version)

    # -- reads ----------------------------------------------------------------------------------------------------
    async def get(self, task: str, version: int | None = None) -> PrefixArtifact:
        """The current (or a given) version, decoded and validated. A stored record that fails to decode raises
        StoredArtifactCorrupt (counted in `decode_failures`): what is stored was validated, so this is no client's
        fault."""
        v, blob = await self._fetch(task, version, "blob")
        try:
            # Decoding checks a checksum and every value: CPU work kept off the event loop.
            artifact = await asyncio.to_thread(decode, blob, max_bytes=self.max_artifact_bytes)
            if artifact.task != task or artifact.version != v:
                raise ArtifactError(f"the record holds {artifact.task!r} v{artifact.version}")
        except ArtifactError as e:
            self.decode_failures += 1
            log.error("stored prefix %s v%d does not decode: %s", task, v, e)
            raise StoredArtifactCorrupt(f"stored prefix {task!r} v{v} does not decode: {e}") from e
        return artifact

    async def get_summary(self, task: str, version: int | None = None) -> dict[str, Any]:
        _, meta = await self._fetch(task, version, "meta")
        return json.loads(meta)

    async def current_version(self, task: str) -> int:
        validate_task_name(task)
        v = await self._read(lambda: self.client.hget(self._task_key(task), "current"))
        if v is None:
            raise TaskNotFound(f"task {task!r} not found")
        return int(v)

    async def versions(self, task: str) -> list[dict[str, Any]]:
        """Summaries of every stored version of a task, oldest first."""
        validate_task_name(task)
        tk = self._task_key(task)
        numbers = [int(v) for v in await self._read(lambda: self.client.zrange(f"{tk}:versions", 0, -1))]
        if not numbers:
            raise TaskNotFound(f"task {task!r} not found")
        prefix = self._version_prefix(task)

        async def metas() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for n in numbers:
                    pipe.hget(f"{prefix}{n}", "meta")
                return await pipe.execute()

        return [json.loads(m) for m in await self._read(metas) if m is not None]

    async def list_tasks(self) -> list[TaskInfo]:
        """Every task with its current version's summary, without loading any tensor."""
        names = sorted(n.decode() for n in await self._read(lambda: self.client.smembers(f"{self.ns}:tasks")))

        async def heads() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hget(self._task_key(name), "current")
                    pipe.zrange(f"{self._task_key(name)}:versions", 0, -1)
                return await pipe.execute()

        raw = await self._read(heads)
        rows = zip(names, raw[::2], raw[1::2], strict=True)
        found = [(name, int(cur), [int(v) for v in vs]) for name, cur, vs in rows if cur]

        async def metas() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for name, cur, _ in found:
                    pipe.hget(f"{self._version_prefix(name)}{cur}", "meta")
                return await pipe.execute()

        infos = []
        for (name, cur, versions), meta in zip(found, await self._read(metas), strict=True):
            if meta is not None:  # the task was deleted between the two round trips
                infos.append(TaskInfo(name=name, current=cur, versions=versions, summary=json.loads(meta)))
        return infos

    async def ping(self) -> None:
        await self._read(self.client.ping)

    async def events(self, on_subscribed: Callable[[], None] | None = None) -> AsyncIterator[StoreEvent]:
        """Yields change events until cancelled; `on_subscribed` runs once the subscription is live. Raises
        StoreUnavailable when the subscription drops: pub/sub does not replay, so a subscriber should treat that
        as "everything may have changed"."""
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
            if on_subscribed is not None:
                on_subscribed()
            while True:
                msg = await pubsub.get_message(timeout=1.0)
                if msg is None or msg.get("type") != "message":
                    continue
                try:
                    yield StoreEvent(**json.loads(msg["data"]))
                except (TypeError, ValueError):
                    log.warning("ignoring malformed store event %r", msg["data"])
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise StoreUnavailable(f"prefix event subscription lost: {e}") from e
        finally:
            try:
                await pubsub.aclose()
            except (RedisError, OSError):
                pass

    async def aclose(self) -> None:
        await self.client.aclose()

    # -- plumbing -------------------------------------------------------------------------------------------------
    async def _fetch(self, task: str, version: int | None, field: str) -> tuple[int, bytes]:
        validate_task_name(task)
        args = [self._version_prefix(task), "" if version is None else version, field]
        res = await self._read(lambda: self._get(keys=[self._task_key(task)], args=args))
        if res is None:
            raise TaskNotFound(f"task {task!r} not found")
        if len(res) < 2:
            if version is None:  # current pointed at a version deleted in the same instant
                raise TaskNotFound(f"task {task!r} not found")
            if not await self._read(lambda: self.client.exists(self._task_key(task))):
                raise TaskNotFound(f"task {task!r} not found")
            raise VersionNotFound(f"task {task!r} has no version {version}")
        return int(res[0]), res[1]

    @staticmethod
    def _raise_missing(rc: int, task: str, version: int) -> None:
        if rc == -3:
            raise TaskNotFound(f"task {task!r} not found")
        if rc == -1:
            raise VersionNotFound(f"task {task!r} has no version {version}")

    async def _read(self, call: Callable[[], Awaitable[T]]) -> T:
        delay = self._backoff
        for attempt in range(self._read_retries + 1):
            try:
                return await call()
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                if attempt == self._read_retries:
                    raise StoreUnavailable(f"Redis unreachable after {attempt + 1} attempts: {e}") from e
                log.warning("Redis read failed (%s); retrying in %.2fs", e, delay)
                await asyncio.sleep(delay)
                delay *= 2
            except ResponseError as e:
                raise StoreUnavailable(f"Redis refused the read: {e}") from e
        raise AssertionError("unreachable")

    async def _write(self, call: Awaitable[T], *, replicate: bool = True) -> T:
        try:
            result = await call
            if self.min_replicas and replicate:
                # WAIT runs on the connection that wrote; a pooled client may hand out another, but WAIT counts the
                # replicas that reached the master's offset, which covers every earlier write on any connection.
                acked = await self.client.execute_command("WAIT", self.min_replicas, int(self.replica_wait_s * 1000))
                if int(acked) < self.min_replicas:
                    raise StoreUnavailable(
                        f"written on the master but {acked} of {self.min_replicas} replicas confirmed it within "
                        f"{self.replica_wait_s:g}s: not acknowledged (a failover now could lose it); retry"
                    )
            return result
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise StoreUnavailable(f"Redis unreachable, the write is not acknowledged: {e}") from e
        except ResponseError as e:
            raise StoreUnavailable(f"Redis refused the write: {e}") from e
