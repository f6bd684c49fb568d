"""Bounded, separate pools for the CPU work requests bring before the engine sees them: tokenising, compiling a
response format's grammar, decoding images, serialising large responses, reading adapters by reference. (Chat
templates render in a process of their own, service/templates.py, because a template can loop.)

Each pool has a few threads, a bound on the jobs in progress or waiting (past it a request is refused at once with
429 and Retry-After, rather than waiting behind everybody) and a per-job budget (past it the caller gets 503; the
thread finishes the job and its result is dropped, and the job keeps its place in the bound until then). So one
client's heavy schemas or image floods fill their own pool's bound, not the tokeniser every plain request needs.
Work inside a pool is bounded in size by the request schemas and the pools' own checks (grammar limits, image
sides and decoded bytes), so a job's thread is never held for long.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from .runtime.errors import Overloaded, QueueFull

T = TypeVar("T")


class CpuPool:
    """Args:
    name: what the pool does, for messages ("tokenising").
    threads: jobs running at once. Few: each thread that allocates keeps a glibc arena.
    queue: jobs waiting at most, beyond those running.
    budget_s: the longest a caller waits for its job, waiting included.
    """

    def __init__(self, name: str, *, threads: int, queue: int, budget_s: float) -> None:
        self.name, self.threads, self.queue, self.budget_s = name, threads, queue, budget_s
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name.replace(" ", "-"))
        self.pending = 0  # jobs submitted and not yet finished (running or waiting), whoever still waits for them

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.pending >= self.threads + self.queue:
            raise QueueFull(
                f"the server is busy {self.name}: {self.pending} jobs running or waiting (limit "
                f"{self.threads + self.queue}); retry later"
            )
        self.pending += 1
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        future.add_done_callback(self._done)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.budget_s)
        except TimeoutError:
            msg = f"the server is busy {self.name}: not done within {self.budget_s:g}s; retry later"
            raise Overloaded(msg) from None

    def _done(self, _: asyncio.Future) -> None:
        self.pending -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class CpuPools:
    """The service's pools, one per kind of work."""

    tokenize: CpuPool
    grammar: CpuPool
    images: CpuPool
    render: CpuPool
    sources: CpuPool
    imports: CpuPool

    @classmethod
    def default(cls) -> CpuPools:
        return cls(
            tokenize=CpuPool("tokenising", threads=2, queue=256, budget_s=30.0),
            grammar=CpuPool("compiling response formats", threads=1, queue=4, budget_s=10.0),
            images=CpuPool("decoding images", threads=2, queue=64, budget_s=30.0),
            render=CpuPool("serialising responses", threads=1, queue=16, budget_s=30.0),
            sources=CpuPool("reading adapters by reference", threads=2, queue=4, budget_s=60.0),
            # An upload's parse and checks (a bias checkpoint compares every weight with the backbone's): one at a
            # time, a few waiting, so concurrent uploads cannot each hold a decoded checkpoint at once.
            imports=CpuPool("importing adapters", threads=1, queue=4, budget_s=300.0),
        )

    def shutdown(self) -> None:
        for pool in (self.tokenize, self.grammar, self.images, self.render, self.sources, self.imports):
            pool.shutdown()
