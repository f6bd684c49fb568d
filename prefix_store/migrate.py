"""Moving a namespace's keys from layout 1 (no hash tags; before Redis Cluster support) to the current layout
(keys.py), so an upgraded server finds every task, version and queued job it had.

Layout 1, under a namespace N:
  N:tasks  N:task:t  N:task:t:versions  N:task:t:v:n  N:task:t:seq  N:train:jobs  N:train:job:id

Layout 1 only ever ran on one Redis (its scripts touched keys of several slots, which a cluster refuses), so the move
runs on one server, where RENAME may cross slots. It is idempotent and run by every service and trainer process at
start; the first to finish writes N:layout, after which the others skip it at the cost of one GET. Each task moves in
one script (its keys and its index entry together), so a reader sees a task either at its old or at its new place.
Processes of the previous release that keep writing after the move are not followed: stop them before upgrading.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis.asyncio as aioredis

from .keys import LAYOUT, KeyLayout

log = logging.getLogger(__name__)

# KEYS[1]: the old global index, KEYS[2]: the task's new bucket index, then (old, new) pairs. ARGV[1]: the task.
# A key already at its new place (a process of this release wrote it first) is kept, except the version counter,
# which takes the larger value so no version number is handed out twice.
_MOVE_TASK = """
local moved, kept = 0, 0
for i = 3, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    if redis.call('EXISTS', KEYS[i + 1]) == 0 then
      redis.call('RENAME', KEYS[i], KEYS[i + 1])
      moved = moved + 1
    else
      if string.sub(KEYS[i], -4) == ':seq' then
        local old = tonumber(redis.call('GET', KEYS[i]))
        if old > tonumber(redis.call('GET', KEYS[i + 1])) then redis.call('SET', KEYS[i + 1], old) end
        redis.call('DEL', KEYS[i])
      end
      kept = kept + 1
    end
  end
end
if redis.call('SREM', KEYS[1], ARGV[1]) == 1 then redis.call('SADD', KEYS[2], ARGV[1]) end
return {moved, kept}
"""


# KEYS[1] -> KEYS[2] unless KEYS[1] is gone (another process moved it since the SCAN) or KEYS[2] is taken.
_MOVE_KEY = """
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('RENAME', KEYS[1], KEYS[2])
  return 1
end
return 0
"""

# The job stream: renamed with its consumer group when the new one does not exist yet; otherwise its jobs are
# queued again on the new stream (their pending state is lost, so a job that was running is handed out again, as
# after a worker's death). One script, so two processes moving at once cannot queue a job twice.
_MOVE_STREAM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('RENAME', KEYS[1], KEYS[2])
  return 1
end
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
  redis.call('XADD', KEYS[2], '*', unpack(entry[2]))
end
redis.call('DEL', KEYS[1])
return 2
"""


@dataclass
class Moved:
    tasks: int = 0
    keys: int = 0
    kept: int = 0  # old keys whose new place was already taken (left where they were; see _MOVE_TASK)
    jobs: int = 0

    def __bool__(self) -> bool:
        return bool(self.tasks or self.jobs or self.kept)


async def migrate_layout(client: aioredis.Redis, namespace: str) -> Moved:
    """Moves layout 1's keys of `namespace` to the current layout (see the module docstring). Returns what moved."""
    keys, moved = KeyLayout(namespace), Moved()
    if await client.get(keys.layout) == str(LAYOUT).encode():
        return moved
    old_task = f"{namespace}:task:"
    by_task: dict[str, list[str]] = {}
    async for raw in client.scan_iter(match=f"{old_task}*", count=1000):
        key = raw.decode()
        by_task.setdefault(key[len(old_task) :].split(":", 1)[0], []).append(key)
    move = client.register_script(_MOVE_TASK)
    for task, old_keys in sorted(by_task.items()):
        pairs = [k for old in old_keys for k in (old, keys.task(task) + old[len(old_task) + len(task) :])]
        n_moved, n_kept = await move(keys=[f"{namespace}:tasks", keys.index_of(task), *pairs], args=[task])
        moved.tasks, moved.keys, moved.kept = moved.tasks + 1, moved.keys + n_moved, moved.kept + n_kept
    moved.jobs = await _move_jobs(client, namespace, keys)
    await client.set(keys.layout, LAYOUT)
    if moved:
        log.warning(
            "moved %d tasks (%d keys) and %d training jobs of namespace %r to key layout %d%s",
            moved.tasks,
            moved.keys,
            moved.jobs,
            namespace,
            LAYOUT,
            f"; {moved.kept} old keys were left, their new place already taken" if moved.kept else "",
        )
    return moved


async def _move_jobs(client: aioredis.Redis, namespace: str, keys: KeyLayout) -> int:
    old_job = f"{namespace}:train:job:"
    move_key, move_stream = client.register_script(_MOVE_KEY), client.register_script(_MOVE_STREAM)
    jobs = 0
    async for raw in client.scan_iter(match=f"{old_job}*", count=1000):
        key = raw.decode()
        jobs += await move_key(keys=[key, keys.job(key[len(old_job) :])])
    await move_stream(keys=[f"{namespace}:train:jobs", keys.jobs])
    return jobs
