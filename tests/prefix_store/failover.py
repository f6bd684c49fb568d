"""Uploads and reads through a failover, shared by the Sentinel and the Cluster tests: a writer publishes versions of
a few tasks while a reader reads their current versions, and a Redis master is killed between two acknowledged
uploads. The figures say what a client saw."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prefix_store import (
    BackboneFingerprint,
    PrefixArtifact,
    PrefixStore,
    StoredArtifactCorrupt,
    StoreUnavailable,
    TaskNotFound,
)
from tests.factories import make_artifact

FP = BackboneFingerprint("llama", 2, 32, 4, 2, 8, 64)


@dataclass
class Figures:
    acked: int = 0  # uploads acknowledged (put returned a version)
    refused: int = 0  # uploads refused with StoreUnavailable (not acknowledged: the client retries)
    lost: int = 0  # acknowledged versions missing or different afterwards
    torn: int = 0  # reads that returned a version whose tensors differ from what was acknowledged, or do not decode
    reads: int = 0  # reads that returned a version
    read_refusals: int = 0  # reads refused with StoreUnavailable
    recover_s: float | None = None  # from the kill to the next acknowledged upload of the task on the killed master
    errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"acked {self.acked}, refused {self.refused}, lost {self.lost}, torn {self.torn} of {self.reads} reads "
            f"({self.read_refusals} reads refused), recovered in {self.recover_s:.2f} s"
            if self.recover_s is not None
            else f"did not recover: {self.errors[-3:]}"
        )


async def uploads_through_failover(
    store: PrefixStore,
    reader_store: PrefixStore,
    tasks: list[str],
    kill: Callable[[], None],
    *,
    lister: PrefixStore | None = None,
    uploads: int = 15,
    kill_after: int = 5,
    timeout_s: float = 60,
) -> Figures:
    """Publishes `uploads` acknowledged versions round-robin over `tasks` through `store` (the first task's master is
    the one `kill` stops, after `kill_after` acknowledgements) while `reader_store` (its own connections, the
    serving defaults for retries) reads every task's current version, and `lister` (if given) lists the tasks; then
    checks every acknowledged version, and that the lister lists every task again."""
    fig = Figures()
    acked: dict[tuple[str, int], PrefixArtifact] = {}
    done = asyncio.Event()
    killed_at: float | None = None

    async def reader() -> None:
        while not done.is_set():
            for task in tasks:
                try:
                    got = await reader_store.get(task)
                except (StoreUnavailable, TaskNotFound):
                    fig.read_refusals += 1
                    continue
                except StoredArtifactCorrupt:
                    fig.torn += 1
                    continue
                fig.reads += 1
                sent = acked.get((task, got.version))
                if got.task != task or (sent is not None and not _same(got, sent)):
                    fig.torn += 1
            if lister is not None:
                try:
                    await lister.list_tasks()
                except StoreUnavailable:
                    fig.read_refusals += 1
            await asyncio.sleep(0.01)

    reading = asyncio.create_task(reader())
    deadline = time.monotonic() + timeout_s
    i = 0
    try:
        while fig.acked < uploads and time.monotonic() < deadline:
            task = tasks[i % len(tasks)]
            art = make_artifact(task, "p_tuning_v2", P=2 + i % 3, fp=FP, seed=i)
            try:
                stored = await store.put(art)
            except StoreUnavailable as e:
                fig.refused += 1
                fig.errors.append(str(e))
                await asyncio.sleep(0.1)
                continue  # the same task again: its recovery is what is timed
            i += 1
            acked[(task, stored.version)] = stored
            fig.acked += 1
            if killed_at is not None and fig.recover_s is None and task == tasks[0]:
                fig.recover_s = time.monotonic() - killed_at
            await asyncio.sleep(0.05)  # the reader reads between uploads
            if fig.acked == kill_after:
                kill()  # a master dies between two acknowledged uploads
                killed_at = time.monotonic()
    finally:
        done.set()
        await reading
    for (task, version), sent in acked.items():
        try:
            got = await store.get(task, version)
        except (StoreUnavailable, TaskNotFound, StoredArtifactCorrupt, LookupError) as e:
            fig.errors.append(f"{task} v{version}: {e}")
            fig.lost += 1
            continue
        fig.lost += not _same(got, sent)
    if lister is not None and sorted(i.name for i in await lister.list_tasks()) != sorted(tasks):
        fig.errors.append("the lister does not list every task after the failover")
        fig.lost += 1
    for task in {t for t, _ in acked}:
        newest = max(v for t, v in acked if t == task)
        if (await store.current_version(task)) < newest:
            fig.lost += 1
            fig.errors.append(f"{task}: current is older than v{newest}")
    return fig


def _same(got: PrefixArtifact, sent: PrefixArtifact) -> bool:
    return (
        got.version == sent.version
        and got.created_at == sent.created_at
        and got.kv.shape == sent.kv.shape
        and bool((got.kv == sent.kv).all())
    )
