"""Where everything lives in Redis: the key layout of the store and the job queue, the same on one server, behind
Sentinel and on Redis Cluster.

Redis Cluster runs a command or a Lua script only when all its keys hash to one slot, and a key's slot is taken
from the part between its first `{` and the next `}` (its hash tag) when it has one. So every key carries a tag:

  {N:b}:tasks                   set: the names of bucket b's tasks that have at least one version
  {N:b}:pinned                  set: the names of bucket b's tasks pinned resident on every replica
  {N:b}:task:t                  hash: current (served version), latest (highest committed version), traffic (a
                                split of unpinned requests, JSON {"version": weight}; absent: all to current), pinned
                                ("1" while the task is pinned)
  {N:b}:task:t:versions         sorted set of stored version numbers
  {N:b}:task:t:v:n              hash: meta (summary JSON, for listings), blob (the encoded artifact)
  {N:b}:task:t:seq              version counter; it survives deleting the task, so a (task, version) pair is never
                                reused and caches keyed by it can never serve stale tensors
  {N:train}:jobs                stream of training jobs (consumer group "trainers")
  {N:train}:job:id              hash: one job's state
  {N:train}:jobs:index          sorted set: job id -> when it was queued (unix seconds), the newest MAX_JOB_INDEX
                                (listings; ids whose record expired are dropped as they are met)
  {N:train}:jobs:workers        sorted set: worker name -> when it was last seen (unix seconds)
  {N:replicas}:index            sorted set: replica id -> when it last announced itself (unix seconds)
  {N:replicas}:r:id             string: that replica's view (JSON: backbone, load, resident and pinned task
                                versions), expiring unless announced again (replicas.py)
  {N:keys}:records              hash: API key name -> its record (JSON: scope, task globs, limits, priority,
                                created_at, and the SHA-256 digest of its secret; never the secret)
  {N:keys}:digests              hash: secret digest -> key name (how a bearer key is looked up)
  {N:keys}:names                sorted set of key names, all scored 0 (listed in name order, a page at a time)
  {N:keys}:rate:k               hash: key k's requests ("r<w>") and tokens ("t<w>") charged in minute window w;
                                expires two windows after its last charge
  N:layout                      the layout's number (LAYOUT), written once the keys of an older layout are moved
  N:events                      pub/sub channel (not a key): one JSON event per publish, delete, rollback, traffic
                                change, pin and unpin
  N:key-events                  pub/sub channel: one JSON event per revoked API key ({"type": "revoke", "name"})

where N is the namespace and b = bucket(t), one of BUCKETS, a function of the task name alone. A task's keys and
its bucket's index and pinned set share the slot of the tag {N:b}, so each store script (commit, delete, rollback,
traffic, pin: the task's keys and the bucket's sets together) stays one atomic script on a cluster too. The bucketed
index is what makes that possible: a single global set would sit in another slot than almost every task. Listing
reads the BUCKETS sets in one pipeline (one round trip per cluster node). The job stream and its job hashes share
{N:train}, so queuing a job (hash + stream entry) stays one MULTI. Every API key record and rate counter shares
{N:keys} (tenants.py), so creating, revoking and charging a key are one atomic script each there too.

BUCKETS is part of the layout: changing it moves tasks between buckets, so it would be a new LAYOUT with a migration.
"""

from __future__ import annotations

import re
import zlib

LAYOUT = 2
BUCKETS = 1024
_NAMESPACE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def validate_namespace(namespace: str) -> str:
    """A namespace must not hold ':' (keys are split on it), nor '{' or '}' (it sits inside hash tags)."""
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise ValueError(
            f"invalid Redis namespace {namespace!r}: expected 1 to 64 characters from letters, digits, '.', '_', '-'"
        )
    return namespace


def bucket(task: str) -> int:
    """The task's bucket: CRC-32 of its name, so every process (and every version of this code) agrees."""
    return zlib.crc32(task.encode()) % BUCKETS


class KeyLayout:
    """Key names under one namespace (see the module docstring)."""

    def __init__(self, namespace: str) -> None:
        self.ns = validate_namespace(namespace)
        self.channel = f"{namespace}:events"
        self.layout = f"{namespace}:layout"
        self.jobs = f"{{{namespace}:train}}:jobs"
        self.job_prefix = f"{{{namespace}:train}}:job:"
        self.key_records = f"{{{namespace}:keys}}:records"
        self.key_digests = f"{{{namespace}:keys}}:digests"
        self.key_names = f"{{{namespace}:keys}}:names"
        self.key_channel = f"{namespace}:key-events"
        self.replicas = f"{{{namespace}:replicas}}:index"
        self.replica_prefix = f"{{{namespace}:replicas}}:r:"

    def _tag(self, b: int) -> str:
        return f"{{{self.ns}:{b:04d}}}"

    def index(self, b: int) -> str:
        return f"{self._tag(b)}:tasks"

    def indexes(self) -> list[str]:
        return [self.index(b) for b in range(BUCKETS)]

    def index_of(self, task: str) -> str:
        return self.index(bucket(task))

    def pinned(self, b: int) -> str:
        return f"{self._tag(b)}:pinned"

    def pinned_sets(self) -> list[str]:
        return [self.pinned(b) for b in range(BUCKETS)]

    def pinned_of(self, task: str) -> str:
        return self.pinned(bucket(task))

    def task(self, task: str) -> str:
        return f"{self._tag(bucket(task))}:task:{task}"

    def versions(self, task: str) -> str:
        return f"{self.task(task)}:versions"

    def version_prefix(self, task: str) -> str:
        return f"{self.task(task)}:v:"

    def version(self, task: str, version: int) -> str:
        return f"{self.version_prefix(task)}{version}"

    def seq(self, task: str) -> str:
        return f"{self.task(task)}:seq"

    def job(self, job_id: str) -> str:
        return self.job_prefix + job_id

    def key_rate(self, name: str) -> str:
        return f"{{{self.ns}:keys}}:rate:{name}"
