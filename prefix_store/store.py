"""The Redis prefix store: immutable task versions, an atomic "current" pointer, and change events, on one Redis,
behind Sentinel or on Redis Cluster. Key names are in `keys.py`.

A publish reserves a version with INCR, encodes the artifact with that number inside it, then one Lua script
writes the version, adds the task to its bucket's index and moves `current` to it only if no higher version was
committed meanwhile. Lua scripts run atomically, so a reader (also a script) sees either the old or the new version,
never half of one; every script touches one task's keys and its bucket's index only, which share a hash slot, so
this holds on a cluster too. Events are plain PUBLISH, which a cluster forwards to every node: a subscriber on any
node hears every task's changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
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
from .keys import KeyLayout
from .migrate import Moved, migrate_layout

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

# The task hash goes with its traffic split and pin; KEYS[4], the bucket's pinned set, forgets the pin too.
_DELETE_TASK = """
local versions = redis.call('ZRANGE', KEYS[2], 0, -1)
if redis.call('EXISTS', KEYS[1]) == 0 and #versions == 0 then return 0 end
for _, v in ipairs(versions) do redis.call('DEL', ARGV[2] .. v) end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('PUBLISH', ARGV[3], cjson.encode({type='delete', task=ARGV[1]}))
return #versions
"""

# A version the traffic split names (even at weight 0) is refused like the current one ({-4, the split}): deleting
# it would leave the split pointing at nothing on every replica.
_DELETE_VERSION = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -3 end
if redis.call('EXISTS', KEYS[3]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'current') == ARGV[2] then return -2 end
local traffic = redis.call('HGET', KEYS[1], 'traffic')
if traffic and cjson.decode(traffic)[ARGV[2]] ~= nil then return {-4, traffic} end
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[2], ARGV[2])
local current = tonumber(redis.call('HGET', KEYS[1], 'current'))
redis.call('PUBLISH', ARGV[3], cjson.encode({type='delete_version', task=ARGV[1], version=tonumber(ARGV[2]),
  current=current}))
return 1
"""

# A rollback is the way back to one known version: it clears the traffic split too (subscribers know from the type).
_ROLLBACK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -3 end
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
redis.call('HSET', KEYS[1], 'current', ARGV[2])
redis.call('HDEL', KEYS[1], 'traffic')
redis.call('PUBLISH', ARGV[3], cjson.encode({type='rollback', task=ARGV[1], version=tonumber(ARGV[2]),
  current=tonumber(ARGV[2])}))
return 1
"""

# KEYS[1]: the task hash, KEYS[2]: its versions. ARGV[1]: the task, ARGV[2]: the split as JSON {"version": weight}
# ('' clears it), ARGV[3]: the channel, ARGV[4..]: the versions it names. Returns {1}, {-3} (no task) or {-1, the
# versions that do not exist}: a split names stored versions only, checked in the same atomic step that writes it.
_TRAFFIC = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-3} end
local missing = {-1}
for i = 4, #ARGV do
  if not redis.call('ZSCORE', KEYS[2], ARGV[i]) then missing[#missing + 1] = ARGV[i] end
end
if #missing > 1 then return missing end
local event = {type='traffic', task=ARGV[1], current=tonumber(redis.call('HGET', KEYS[1], 'current'))}
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], 'traffic')
else
  redis.call('HSET', KEYS[1], 'traffic', ARGV[2])
  event['traffic'] = cjson.decode(ARGV[2])
end
redis.call('PUBLISH', ARGV[3], cjson.encode(event))
return {1}
"""

# KEYS[1]: the task hash, KEYS[2]: its bucket's pinned set. ARGV[1]: the task, ARGV[2]: 'pin' or 'unpin', ARGV[3]:
# the channel. -3: no such task.
_PIN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -3 end
if ARGV[2] == 'pin' then
  redis.call('HSET', KEYS[1], 'pinned', '1')
  redis.call('SADD', KEYS[2], ARGV[1])
else
  redis.call('HDEL', KEYS[1], 'pinned')
  redis.call('SREM', KEYS[2], ARGV[1])
end
redis.call('PUBLISH', ARGV[3], cjson.encode({type=ARGV[2], task=ARGV[1],
  current=tonumber(redis.call('HGET', KEYS[1], 'current'))}))
return 1
"""

MAX_TRAFFIC_ENTRIES = 16  # versions one traffic split may name
MAX_TRAFFIC_WEIGHT = 1_000_000  # one version's weight at most (Lua's cjson writes larger numbers inexactly)


@dataclass(frozen=True)
class StoreEvent:
    """A change announced on the events channel. `version` is the version the event is about."""

    type: str  # "publish" | "delete" | "delete_version" | "rollback" | "traffic" | "pin" | "unpin"
    task: str
    version: int | None = None
    current: int | None = None  # the task's current version after the change; None once the task is deleted
    # "traffic": the split now in force, {"version": weight} (None: cleared, all unpinned requests go to current).
    # A rollback clears the split as well; the other events leave it as it was.
    traffic: dict[str, int] | None = None


@dataclass(frozen=True)
class Routing:
    """Where a task's unpinned requests go, and whether it is kept resident, as stored with the task."""

    current: int
    traffic: dict[int, int] | None  # version -> weight; None: every unpinned request runs `current`
    pinned: bool


@dataclass(frozen=True)
class TaskInfo:
    name: str
    current: int
    versions: list[int]
    summary: dict[str, Any]  # PrefixArtifact.summary() of the current version


SENTINEL_SCHEME = "redis+sentinel://"
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
Client = aioredis.Redis | RedisCluster

# Faults after which the same call may succeed: a lost connection, a cluster failing over (CLUSTERDOWN, TRYAGAIN, a
# slot no node serves yet), or a cluster client that cannot reach any node to learn the topology.
TRANSIENT = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterError,  # includes CLUSTERDOWN, and the client's "TTL exhausted" after too many redirects
    TryAgainError,
    SlotNotCoveredError,
    RedisClusterException,
)


def register_script(client: Client, script: str) -> AsyncScript:
    """client.register_script on either kind of client (a cluster runs a script on the node of its keys' slot)."""
    return client.register_script(script)  # type: ignore[misc]  # redis-py types its self as the plain client only


def reply(response: object) -> Awaitable[Any]:
    """The reply of a command on an asyncio client, to be awaited and annotated where it is used. redis-py types each
    command once for its sync and asyncio clients (`Awaitable[T] | T`), and as text even without decode_responses
    (the replies here are bytes); its asyncio clients always return an awaitable."""
    assert inspect.isawaitable(response), "a command of an asyncio client returns an awaitable"
    return response


@contextlib.asynccontextmanager
async def refresh_slots_on_fault(client: Client) -> AsyncIterator[None]:
    """Around a cluster pipeline or slot lookup: on a transient fault, marks the client's slot table stale so that
    the next call reloads it. A plain command does that itself when its node is gone or a failover moved its slot;
    a pipeline (with no retries) and a slot lookup do not, and would go on to the dead node for ever."""
    try:
        yield
    except TRANSIENT:
        if isinstance(client, RedisCluster):
            await client.aclose()  # closing is the public way to mark it stale
        raise


def connect(url: str, *, socket_timeout: float = 5.0) -> Client:
    """A client for tensor blobs: bytes responses, and no automatic retries, since the store decides which
    commands are safe to repeat (reads are; a publish's INCR is not).

    `redis://` / `rediss://` / `unix://`: one server. `redis+sentinel://[:password@]host:port[,host:port...]/service
    [/db]`: the master Sentinel names for `service`, found again after a failover (each new connection asks).
    `redis+cluster://[:password@]host:port[,host:port...]` (`rediss+cluster://` for TLS): a Redis Cluster, any of its
    nodes as the seed; the client learns the slots and follows MOVED/ASK redirects within a call, and a lost node
    marks its slot table stale so that the next call reloads it (the call itself is not repeated, as above)."""
    options: dict[str, Any] = {
        "decode_responses": False,
        "retry": Retry(NoBackoff(), 0),
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
    }
    if url.startswith(CLUSTER_SCHEMES):
        nodes, password, tls = parse_cluster_url(url)
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in nodes],
            password=password,
            ssl=tls,
            **options,
        )
    if not url.startswith(SENTINEL_SCHEME):
        return aioredis.Redis.from_url(url, **options)
    from redis.asyncio.sentinel import Sentinel

    sentinels, service, db, password = parse_sentinel_url(url)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py's asyncio Sentinel.__init__ is unannotated
        sentinels, sentinel_kwargs={"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout}
    )
    master: aioredis.Redis = sentinel.master_for(service, db=db, password=password, **options)
    return master


def check_redis_url(url: str) -> None:
    """Raises ValueError naming what is wrong with a URL `connect` would not take."""
    schemes = ("redis://", "rediss://", "unix://", SENTINEL_SCHEME, *CLUSTER_SCHEMES)
    if not url.startswith(schemes):
        raise ValueError(f"{url!r}: expected a URL starting with one of {', '.join(schemes)}")
    if url.startswith(SENTINEL_SCHEME):
        parse_sentinel_url(url)
    elif url.startswith(CLUSTER_SCHEMES):
        parse_cluster_url(url)


def _split_auth(rest: str) -> tuple[str | None, str]:
    """(password, the rest) of `[user:]password@rest`."""
    if "@" not in rest:
        return None, rest
    auth, rest = rest.rsplit("@", 1)
    return auth.split(":", 1)[-1] or None, rest


def _host_ports(hosts: str, default_port: int, url: str, expected: str) -> list[tuple[str, int]]:
    found = []
    for h in hosts.split(","):
        host, sep, port = h.rpartition(":")
        if not sep:
            host, port = h, str(default_port)
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{url!r}: bad address {h!r}; expected {expected}")
        found.append((host, int(port)))
    return found


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int, str | None]:
    """(sentinel addresses, service name, db, password) of a redis+sentinel:// URL."""
    expected = "redis+sentinel://host:port[,host:port]/service[/db]"
    password, rest = _split_auth(url[len(SENTINEL_SCHEME) :])
    hosts, _, path = rest.partition("/")
    parts = [p for p in path.split("/") if p]
    if not hosts or not parts:
        raise ValueError(f"{url!r}: expected {expected}")
    return _host_ports(hosts, 26379, url, expected), parts[0], int(parts[1]) if len(parts) > 1 else 0, password


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], str | None, bool]:
    """(seed node addresses, password, TLS) of a redis+cluster:// or rediss+cluster:// URL. A cluster has one
    database, so a path other than `/` or `/0` is refused."""
    expected = "redis+cluster://host:port[,host:port]"
    tls = url.startswith("rediss+")
    password, rest = _split_auth(url.split("://", 1)[1])
    hosts, _, path = rest.partition("/")
    if path.strip("/") not in ("", "0"):
        raise ValueError(f"{url!r}: a Redis Cluster has only database 0; expected {expected}")
    if not hosts:
        raise ValueError(f"{url!r}: expected {expected}")
    return _host_ports(hosts, 6379, url, expected), password, tls


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
        client: a client made with `connect` (bytes responses): one server, Sentinel's master, or a cluster.
        namespace: key prefix, so several deployments or test runs can share one server (see keys.py).
        max_artifact_bytes: the size cap applied when writing and when decoding.
        read_retries / retry_backoff_s: reads are retried with exponential backoff on transient faults.
        min_replicas: a write is acknowledged only once this many replicas have it (Redis WAIT), so a failover to
            one of them (Sentinel, or a cluster's replica) cannot lose an acknowledged version; 0: the master's word
            is enough.
        replica_wait_s: how long a write waits for them before it is reported unacknowledged (StoreUnavailable).
    """

    def __init__(
        self,
        client: Client,
        *,
        namespace: str = "prefixserve",
        max_artifact_bytes: int = DEFAULT_MAX_BYTES,
        read_retries: int = 3,
        retry_backoff_s: float = 0.05,
        min_replicas: int = 0,
        replica_wait_s: float = 2.0,
    ) -> None:
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        self.keys = KeyLayout(namespace)
        self.min_replicas = min_replicas
        self.replica_wait_s = replica_wait_s
        self.max_artifact_bytes = max_artifact_bytes
        self._read_retries = read_retries
        self.decode_failures = 0  # stored records that failed to decode (a server-side fault; see get)
        self._backoff = retry_backoff_s
        self._commit = register_script(client, _COMMIT)
        self._get = register_script(client, _GET)
        self._delete_task = register_script(client, _DELETE_TASK)
        self._delete_version = register_script(client, _DELETE_VERSION)
        self._rollback = register_script(client, _ROLLBACK)
        self._traffic = register_script(client, _TRAFFIC)
        self._pin = register_script(client, _PIN)
        self._layout_checked = self.cluster
        self._layout_lock = asyncio.Lock()

    @property
    def ns(self) -> str:
        return self.keys.ns

    @property
    def channel(self) -> str:
        return self.keys.channel

    async def migrate_layout(self) -> Moved:
        """Moves this namespace's keys from the untagged layout of earlier releases (migrate.py); a no-op on a
        cluster, where that layout never ran, and once done. Every read and write runs it first until it has
        succeeded, so no process serves or publishes with the old tasks hidden (and their version numbers handed
        out again) because Redis was down when it started."""
        try:
            return await self._migrate_once()
        except TRANSIENT as e:
            raise StoreUnavailable(f"Redis unreachable, the key layout was not checked: {e}") from e
        except ResponseError as e:
            raise StoreUnavailable(f"Redis refused the key layout move: {e}") from e

    async def _migrate_once(self) -> Moved:
        """migrate_layout with Redis's own errors, for callers that retry them."""
        if self._layout_checked:
            return Moved()
        async with self._layout_lock:
            if self._layout_checked:
                return Moved()
            client = self.client
            assert not isinstance(client, RedisCluster), "a cluster never ran the untagged layout (_layout_checked)"
            moved = await migrate_layout(client, self.ns)
            self._layout_checked = True
            return moved

    # -- writes ---------------------------------------------------------------------------------------------------
    async def put(self, artifact: PrefixArtifact) -> PrefixArtifact:
        """Stores `artifact` as the task's next version and makes it current. Returns it with its version set.

        A version number given on the artifact is ignored: numbers are assigned here, per task, increasing.
        """
        if artifact.nbytes > self.max_artifact_bytes:
            limit = self.max_artifact_bytes
            raise ArtifactTooLarge(f"prefix tensors are {artifact.nbytes} bytes: the limit is {limit}")
        task, k = artifact.task, self.keys
        version = int(await self._next_version(task))
        created = artifact.created_at or datetime.now(UTC).isoformat(timespec="seconds")
        stamped = dataclasses.replace(artifact, version=version, created_at=created)
        blob = encode(stamped)
        if len(blob) > self.max_artifact_bytes:
            raise ArtifactTooLarge(f"encoded artifact is {len(blob)} bytes: the limit is {self.max_artifact_bytes}")
        meta = json.dumps({**stamped.summary(), "encoded_bytes": len(blob)})
        keys = [k.task(task), k.version(task, version), k.versions(task), k.index_of(task)]
        await self._write(self._commit, keys, [task, version, meta, blob, self.channel])
        log.info("published %s v%d (%d bytes)", task, version, len(blob))
        return stamped

    async def _next_version(self, task: str) -> int:
        """Reserves the task's next version number. With min_replicas, replicas confirm the reservation before the
        version is written: a failover must not hand the same number out again, since caches keyed by (task,
        version) may already hold what a lost write published under it."""
        await self._write_unacked(self._migrate_once())
        seq = self.keys.seq(task)
        if not self.min_replicas:
            return int(await self._write_unacked(reply(self.client.incr(seq))))
        return int(await self._replicated(("INCR", seq), seq))

    async def put_bytes(self, data: bytes, *, task: str | None = None) -> PrefixArtifact:
        """Decodes (and so fully validates) an encoded artifact, then publishes it, optionally under another name."""
        artifact = decode(data, max_bytes=self.max_artifact_bytes)
        return await self.put(artifact if task is None else artifact.with_task(task))

    async def delete(self, task: str, version: int | None = None) -> None:
        """Deletes a whole task, or one version of it that is not the current one."""
        validate_task_name(task)
        k = self.keys
        if version is None:
            keys = [k.task(task), k.versions(task), k.index_of(task), k.pinned_of(task)]
            n = await self._write(self._delete_task, keys, [task, k.version_prefix(task), self.channel])
            if n == 0:
                raise TaskNotFound(f"task {task!r} not found")
            return
        keys = [k.task(task), k.versions(task), k.version(task, version)]
        rc = await self._write(self._delete_version, keys, [task, version, self.channel])
        if isinstance(rc, list):  # {-4, the split}
            split = ", ".join(f"v{v}: {w}" for v, w in json.loads(rc[1]).items())
            raise VersionConflict(
                f"version {version} of {task!r} is named by its traffic split ({split}): change the split (PUT "
                f"/v1/tasks/{task}/traffic) or delete it first"
            )
        if rc == -2:
            raise VersionConflict(
                f"version {version} is the current version of {task!r}: roll back to another version first, "
                "or delete the task"
            )
        self._raise_missing(rc, task, version)

    async def rollback(self, task: str, version: int) -> None:
        """Makes an existing older (or newer) version current again, and clears the task's traffic split (every
        unpinned request runs this version). Later publishes still get fresh numbers."""
        validate_task_name(task)
        keys = [self.keys.task(task), self.keys.version(task, version)]
        rc = await self._write(self._rollback, keys, [task, version, self.channel])
        self._raise_missing(rc, task, version)

    async def set_traffic(self, task: str, weights: dict[int, int] | None) -> None:
        """Splits the task's unpinned requests between versions by weight ({version: weight}, non-negative ints
        summing above 0, at most MAX_TRAFFIC_ENTRIES versions, each stored), or with None clears the split (every
        unpinned request runs the current version again). Every replica hears it as a "traffic" event. Raises
        TaskNotFound, or VersionNotFound naming every version that does not exist."""
        validate_task_name(task)
        split = "" if weights is None else json.dumps({str(v): w for v, w in sorted(_check_weights(weights).items())})
        names = [] if weights is None else sorted(weights)
        keys = [self.keys.task(task), self.keys.versions(task)]
        rc = await self._write(self._traffic, keys, [task, split, self.channel, *names])
        if int(rc[0]) == -3:
            raise TaskNotFound(f"task {task!r} not found")
        if int(rc[0]) == -1:
            missing = [m.decode() if isinstance(m, bytes) else str(m) for m in rc[1:]]
            raise VersionNotFound(
                f"task {task!r} has no version{'s' if len(missing) > 1 else ''} {', '.join(missing)}: a traffic "
                "split names stored versions only"
            )

    async def pin(self, task: str, pinned: bool = True) -> None:
        """Marks the task pinned (kept resident on every replica's device, following its current version) or, with
        `pinned` False, not; every replica hears it as a "pin" / "unpin" event. Raises TaskNotFound."""
        validate_task_name(task)
        keys = [self.keys.task(task), self.keys.pinned_of(task)]
        rc = await self._write(self._pin, keys, [task, "pin" if pinned else "unpin", self.channel])
        if rc == -3:
            raise TaskNotFound(f"task {task!r} not found")

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
        summary: dict[str, Any] = json.loads(meta)
        return summary

    async def current_version(self, task: str) -> int:
        validate_task_name(task)
        v: bytes | None = await self._read(lambda: reply(self.client.hget(self.keys.task(task), "current")))
        if v is None:
            raise TaskNotFound(f"task {task!r} not found")
        return int(v)

    async def routing(self, task: str) -> Routing:
        """The task's current version, traffic split and pin, in one read. Raises TaskNotFound."""
        validate_task_name(task)
        key = self.keys.task(task)
        current, traffic, pinned = await self._read(
            lambda: reply(self.client.hmget(key, ["current", "traffic", "pinned"]))
        )
        if current is None:
            raise TaskNotFound(f"task {task!r} not found")
        split = None if traffic is None else {int(v): int(w) for v, w in json.loads(traffic).items()}
        return Routing(int(current), split, pinned is not None)

    async def pinned_tasks(self) -> list[str]:
        """The names of every pinned task, sorted: one pipelined read of the buckets' pinned sets (per cluster
        node), whatever the number of tasks."""
        members = await self._pipelined([("SMEMBERS", key) for key in self.keys.pinned_sets()])
        return sorted(n.decode() for group in members for n in group)

    async def versions(self, task: str) -> list[dict[str, Any]]:
        """Summaries of every stored version of a task, oldest first."""
        validate_task_name(task)
        numbers = [int(v) for v in await self._read(lambda: self.client.zrange(self.keys.versions(task), 0, -1))]
        if not numbers:
            raise TaskNotFound(f"task {task!r} not found")
        metas = await self._pipelined([("HGET", self.keys.version(task, n), "meta") for n in numbers])
        return [json.loads(m) for m in metas if m is not None]

    async def task_names(self, q: str = "") -> list[str]:
        """The names of every task, sorted, or of those containing `q`: one pipelined round trip (per cluster node),
        no task read, so a console can page through thousands."""
        members = await self._pipelined([("SMEMBERS", key) for key in self.keys.indexes()])
        return sorted(name for group in members for n in group if q in (name := n.decode()))

    async def list_tasks(self, names: list[str] | None = None) -> list[TaskInfo]:
        """Every task (or those of `names`, e.g. a page of `task_names`; unknown ones left out) with its current
        version's summary, without loading any tensor: three pipelined round trips (per cluster node), whatever the
        number of tasks."""
        k = self.keys
        if names is None:
            names = await self.task_names()
        heads = []
        for name in names:
            heads += [("HGET", k.task(name), "current"), ("ZRANGE", k.versions(name), 0, -1)]
        raw = await self._pipelined(heads)
        rows = zip(names, raw[::2], raw[1::2], strict=True)
        found = [(name, int(cur), [int(v) for v in vs]) for name, cur, vs in rows if cur]
        metas = await self._pipelined([("HGET", k.version(name, cur), "meta") for name, cur, _ in found])
        infos = []
        for (name, cur, versions), meta in zip(found, metas, strict=True):
            if meta is not None:  # the task was deleted between two round trips
                infos.append(TaskInfo(name=name, current=cur, versions=versions, summary=json.loads(meta)))
        return infos

    async def ping(self) -> None:
        await self._read(lambda: reply(self.client.ping()))

    async def events(self, on_subscribed: Callable[[], None] | None = None) -> AsyncIterator[StoreEvent]:
        """Yields change events until cancelled; `on_subscribed` runs once the subscription is live. Raises
        StoreUnavailable when the subscription drops: pub/sub does not replay, so a subscriber should treat that
        as "everything may have changed"."""
        async for data in self.subscribe(self.channel, "prefix", on_subscribed):
            try:
                yield StoreEvent(**data)
            except TypeError:
                log.warning("ignoring malformed store event %r", data)

    async def subscribe(
        self, channel: str, what: str, on_subscribed: Callable[[], None] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Yields the JSON objects published on `channel` until cancelled (anything else is logged and skipped);
        `on_subscribed` runs once the subscription is live. Raises StoreUnavailable (naming `what` events) when it
        cannot subscribe or the subscription drops."""
        try:
            conn = await self._subscriber_client()
        except TRANSIENT as e:
            raise StoreUnavailable(f"{what} event subscription failed: {e}") from e
        pubsub = conn.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            if on_subscribed is not None:
                on_subscribed()
            while True:
                msg = await pubsub.get_message(timeout=1.0)
                if msg is None or msg.get("type") != "message":
                    continue
                try:
                    data = json.loads(msg["data"])
                except ValueError:
                    data = None
                if isinstance(data, dict):
                    yield data
                else:
                    log.warning("ignoring malformed %s event %r", what, msg["data"])
        except TRANSIENT as e:
            raise StoreUnavailable(f"{what} event subscription lost: {e}") from e
        finally:
            try:
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py's PubSub.aclose is unannotated
                if conn is not self.client:
                    await conn.aclose()
            except (RedisError, OSError):
                pass

    async def aclose(self) -> None:
        await self.client.aclose()

    # -- plumbing -------------------------------------------------------------------------------------------------
    async def _subscriber_client(self) -> aioredis.Redis:
        """The client to subscribe with. On a cluster, a plain connection to one node, which hears every PUBLISH of
        the cluster: nodes are tried in random order, so a subscriber whose node died moves to a live one."""
        if not isinstance(self.client, RedisCluster):
            return self.client
        await self.client.initialize()  # a no-op once the slot table is loaded and fresh
        nodes = self.client.get_nodes()
        random.shuffle(nodes)
        last: Exception | None = None
        for node in nodes:
            conn = aioredis.Redis(host=node.host, port=int(node.port), **_node_options(self.client))
            try:
                await reply(conn.ping())
                return conn
            except TRANSIENT as e:
                last = e
                await conn.aclose()
            except BaseException:  # cancelled while connecting: the caller never gets the connection to close
                await conn.aclose()
                raise
        raise RedisConnectionError(f"no cluster node answers: {last}")

    async def _master_of(self, key: str) -> ClusterNode:
        """The cluster node serving `key`'s slot, from the client's slot table (reloaded first if it is stale)."""
        assert isinstance(self.client, RedisCluster)
        await self.client.initialize()  # a no-op unless the table was marked stale
        node = self.client.get_node_from_key(key)
        if node is None:
            raise ClusterError(f"no cluster node serves the slot of {key!r}")  # transient: the table is reloaded
        return node

    async def _fetch(self, task: str, version: int | None, field: str) -> tuple[int, bytes]:
        validate_task_name(task)
        args = [self.keys.version_prefix(task), "" if version is None else version, field]
        res = await self._read(lambda: self._get(keys=[self.keys.task(task)], args=args))
        if res is None:
            raise TaskNotFound(f"task {task!r} not found")
        if len(res) < 2:
            if version is None:  # current pointed at a version deleted in the same instant
                raise TaskNotFound(f"task {task!r} not found")
            if not await self._read(lambda: self.client.exists(self.keys.task(task))):
                raise TaskNotFound(f"task {task!r} not found")
            raise VersionNotFound(f"task {task!r} has no version {version}")
        return int(res[0]), res[1]

    async def _pipelined(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Runs read commands in one pipeline (on a cluster: one per node, in parallel) with the read retries."""
        if not commands:
            return []

        async def run() -> list[Any]:
            async with refresh_slots_on_fault(self.client), self.client.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                return await pipe.execute()

        return await self._read(run)

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
                await self._migrate_once()
                return await call()
            except TRANSIENT as e:
                if attempt == self._read_retries:
                    raise StoreUnavailable(f"Redis unreachable after {attempt + 1} attempts: {e}") from e
                log.warning("Redis read failed (%s); retrying in %.2fs", e, delay)
                await asyncio.sleep(delay)
                delay *= 2
            except ResponseError as e:
                raise StoreUnavailable(f"Redis refused the read: {e}") from e
        raise AssertionError("unreachable")

    async def _write(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """Runs a store script once (a write is never repeated here: the caller sees StoreUnavailable and decides),
        acknowledged by min_replicas replicas when that is set."""
        await self._write_unacked(self._migrate_once())
        if not self.min_replicas:
            return await self._write_unacked(script(keys=keys, args=args))
        # EVAL (not EVALSHA): a pipeline cannot load a script the server lacks between its commands.
        return await self._replicated(("EVAL", script.script, len(keys), *keys, *args), keys[0])

    async def _replicated(self, command: tuple[Any, ...], key: str) -> Any:
        """Runs one write command, then WAIT on the same connection (WAIT waits for the replication offset of its
        own connection's last write: on another connection it would return at once) and on the master of `key`'s
        slot. Raises StoreUnavailable unless min_replicas replicas confirmed it."""

        async def write_and_wait() -> list[Any]:
            async with refresh_slots_on_fault(self.client):
                target = {"target_nodes": await self._master_of(key)} if self.cluster else {}
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.execute_command(*command)
                    pipe.execute_command("WAIT", self.min_replicas, int(self.replica_wait_s * 1000), **target)
                    return await pipe.execute()

        result, acked = await self._write_unacked(write_and_wait())
        if int(acked) < self.min_replicas:
            raise StoreUnavailable(
                f"written on the master but {acked} of {self.min_replicas} replicas confirmed it within "
                f"{self.replica_wait_s:g}s: not acknowledged (a failover now could lose it); retry"
            )
        return result

    @staticmethod
    async def _write_unacked(call: Awaitable[T]) -> T:
        try:
            return await call
        except TRANSIENT as e:
            raise StoreUnavailable(f"Redis unreachable, the write is not acknowledged: {e}") from e
        except ResponseError as e:
            raise StoreUnavailable(f"Redis refused the write: {e}") from e


def _check_weights(weights: dict[int, int]) -> dict[int, int]:
    """A traffic split as the store keeps it, or ValueError naming what is wrong (the HTTP schema checks the same
    first, so this guards runtime callers)."""
    if not weights or len(weights) > MAX_TRAFFIC_ENTRIES:
        raise ValueError(f"a traffic split names 1 to {MAX_TRAFFIC_ENTRIES} versions, got {len(weights)}")
    for v, w in weights.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"a traffic split's versions are positive ints, got {v!r}")
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= MAX_TRAFFIC_WEIGHT:
            raise ValueError(
                f"a traffic split's weights are ints from 0 to {MAX_TRAFFIC_WEIGHT}, got {w!r} for version {v}"
            )
    if not sum(weights.values()):
        raise ValueError("a traffic split's weights must sum above 0")
    return weights


def _node_options(client: RedisCluster) -> dict[str, Any]:
    """Connection settings of a cluster client that a plain client to one of its nodes takes too."""
    names = ("password", "username", "ssl", "socket_timeout", "socket_connect_timeout", "decode_responses")
    kwargs = client.get_connection_kwargs()
    options = {name: kwargs[name] for name in names if name in kwargs}
    connection_class = kwargs.get("connection_class")
    if connection_class is not None and connection_class.__name__ == "SSLConnection":
        options["ssl"] = True
    return options
