"""The decode step compiled with torch.compile on bucketed static shapes (PREFIXSERVE_COMPILE=on).

A step of n decode rows is padded to a batch bucket B >= n (powers of two up to the slot cache's rows, and the
rows themselves), its prefix width to a bucket Pb (0, then powers of two from 16) and the slot positions it reads
to a bucket S (powers of two from kv_cache.MIN_POW2_WIDTH, at most the cache's width; the cache grows in powers of
two, so a bucket never ends inside a segment it does not fill). Each (B, Pb, S) is one graph, traced with
`dynamic=False, fullgraph=True`: inductor's fused C++/OpenMP kernels on a CPU, and `mode="reduce-overhead"` on CUDA,
which captures each graph as a CUDA graph (written, not yet measured: no GPU was at hand). Inside a graph nothing
is read back to the host and no Python runs per layer: masks come from the rows' lengths (attention.GraphInputs).
Padding rows (`real` False) take pad tokens, no prefix and position 0, write their key/values into the cache's
scratch slot, never into their slots n..B-1 (those may hold prefilling rows), and their logits are dropped.

What a graph cannot do yet runs that step eagerly (`eager_reason`, counted in `steps`), never a wrong answer:
per-row adapters (bias, LoRA, IA3 rows: their tables' hooks select rows on the host), sliding-window layers (rings),
and, once `max_graphs` graphs exist, any shape without one. A missing bucket under that bound is compiled when a
step first needs it (that step waits); `warm` compiles the expected ones ahead, at start.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .attention import ATTN_NAME, GRAPH, AttentionBypassed
from .kv_cache import MIN_POW2_WIDTH
from .runner import ModelRunner

log = logging.getLogger(__name__)
MIN_PREFIX_BUCKET = 16


class Key(NamedTuple):
    """One graph: batch bucket, prefix-width bucket, slot positions read."""

    B: int
    P: int
    S: int


def batch_buckets(rows: int) -> list[int]:
    """1, 2, 4, ... below `rows`, and `rows` (a step never has more decode rows than slots)."""
    out, b = [], 1
    while b < rows:
        out.append(b)
        b *= 2
    return [*out, rows]


def up(n: int, ladder: Sequence[int]) -> int:
    return next(b for b in ladder if b >= n)


def prefix_bucket(P: int) -> int:
    return 0 if P == 0 else max(MIN_PREFIX_BUCKET, 1 << (P - 1).bit_length())


def slot_bucket(S: int, width: int) -> int:
    return min(width, max(MIN_POW2_WIDTH, 1 << (S - 1).bit_length()))


@dataclass
class WarmProgress:
    """How far the warm-up at start has come, for /ready (read from any thread)."""

    warmed: int = 0
    buckets: int = 0
    done: bool = False
    seconds: list[float] = field(default_factory=list)  # compile time of each warmed bucket

    @property
    def check(self) -> bool | str:
        """True once every bucket is compiled, else how far it got."""
        return True if self.done else f"compiling decode graphs: {self.warmed}/{self.buckets or '?'} buckets"


async def warm_up(
    on_engine: Callable[[Callable[[Any], Any]], Awaitable[Any]],
    progress: WarmProgress,
    after: Callable[[], bool] | None = None,
) -> None:
    """The service's warm-up at start: once `after()` holds (the preloaded tasks are resident, so their prefix
    widths are known), compiles Engine.compile_keys() one graph per engine job (`on_engine`, Scheduler.on_engine),
    so requests keep being served between them."""
    while after is not None and not after():
        await asyncio.sleep(0.2)
    try:
        keys = await on_engine(lambda e: e.compile_keys())
        progress.buckets = len(keys)
        for key in keys:
            progress.seconds.append(await on_engine(functools.partial(_warm_one, key=key)))
            progress.warmed += 1
    finally:  # ready even when the warm-up failed or was cancelled: steps without a graph run eagerly
        progress.done = True


_ENGINES = [0]  # CompiledDecode instances made in this process (they share dynamo's cache of `_forward`)


def _graph_room(max_graphs: int) -> int:
    """Dynamo's recompile limit that leaves every engine made so far its `max_graphs` graphs (and a few more)."""
    _ENGINES[0] += 1
    return _ENGINES[0] * (max_graphs + 8)


def _warm_one(engine: Any, key: Key) -> float:
    return float(engine.warm_compiled(key))


class CompiledDecode:
    """Args:
    runner: the model runner whose decode this replaces (its cache must grow in powers of two and have a scratch
        slot, its pool be reserved: kv_cache.SlotCache(pow2=True, scratch=True), PrefixPool.reserve).
    max_graphs: the most graphs compiled; past it, steps without a graph run eagerly.
    """

    def __init__(self, runner: ModelRunner, max_graphs: int = 64) -> None:
        assert runner.cache is not None and runner.cache.scratch is not None, "a slot cache with a scratch slot"
        self.runner, self.cache, self.max_graphs = runner, runner.cache, max_graphs
        self.body = runner.body
        dev = runner.bb.device
        self.buckets = batch_buckets(self.cache.rows)
        self.graphs: dict[Key, float] = {}  # compiled: its compile time (seconds)
        self.failed: dict[Key, str] = {}  # graphs that failed to compile or run (their steps run eagerly): why
        self.steps: Counter[str] = Counter()  # "compiled", or the reason a step ran eagerly
        self.progress = WarmProgress()
        # Every bucket re-traces the same function: dynamo keeps them all (one cache entry per guard set). Its
        # limits count per code object, and every engine of the process shares `_forward`'s: each engine adds room
        # for its own graphs (a process holds one engine in service; tests hold several).
        self._room = _graph_room(max_graphs)
        self.cuda = dev.type == "cuda"
        mode = "reduce-overhead" if self.cuda else None
        self._fn = torch.compile(self._forward, dynamic=False, fullgraph=True, mode=mode)
        self._rows = torch.arange(self.cache.rows, device=dev)
        self._layer_index = tuple(self.cache._index[i] for i in range(self.cache.L))

    # -- the step ------------------------------------------------------------------------------------------------
    def eager_reason(self, table_slots: torch.Tensor | None) -> str | None:
        """Why a step must run eagerly, or None."""
        if table_slots is not None:
            return "per-row adapters"
        if self.cache.rings:
            return "sliding-window layers"
        return None

    @torch.inference_mode()
    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        past: torch.Tensor,
        prefix_index: torch.Tensor,
        prefix_len: torch.Tensor,
        table_slots: torch.Tensor | None = None,
        task_names: Sequence[Hashable] | None = None,
    ) -> torch.Tensor:
        """ModelRunner.decode's contract (rows in slots 0..n-1; returns (n, V) fp32 logits), through a graph when
        one fits the step."""
        n = tokens.shape[0]
        reason = self.eager_reason(table_slots)
        key = None
        if reason is None:
            S = int(past.max()) + 1  # one read back per step (eager reads one per layer)
            key = Key(up(n, self.buckets), prefix_bucket(prefix_index.shape[1]), slot_bucket(S, self.cache.width))
            if key in self.failed:
                reason = "the shape's graph failed"
            elif key not in self.graphs and len(self.graphs) >= self.max_graphs:
                reason = "no graph for the shape"
        if reason is None and key is not None:
            try:
                logits = self.run(key, tokens, positions, past, prefix_index, prefix_len)
                self.steps["compiled"] += 1
                return logits
            except AttentionBypassed:
                raise
            except Exception as e:  # noqa: BLE001 - a graph that cannot compile or run: that shape runs eagerly
                # The eager forward below rewrites the same cache positions, so a graph that failed midway leaves
                # nothing behind.
                self._failed(key, e)
                reason = "the shape's graph failed"
        self.steps[reason or "?"] += 1
        return self.runner.decode(tokens, positions, past, prefix_index, prefix_len, table_slots, task_names)

    def _failed(self, key: Key, e: Exception) -> None:
        self.failed[key] = f"{type(e).__name__}: {str(e)[:300]}"
        log.error("the compiled decode graph %s failed; its shape runs eagerly from now on: %s", key, self.failed[key])

    def run(
        self,
        key: Key,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        past: torch.Tensor,
        prefix_index: torch.Tensor,
        prefix_len: torch.Tensor,
    ) -> torch.Tensor:
        """The step's n rows padded to the key's buckets: tokens, positions, past, prefix_len (n,), prefix_index
        (n, P) -> logits (n, V); compiles the key's graph first if it has none."""
        n, B = tokens.shape[0], key.B
        pad = B - n
        real = self._real(B, n)  # (B,)
        index = torch.nn.functional.pad(prefix_index, (0, key.P - prefix_index.shape[1], 0, pad))  # (B, Pb)
        padded = [torch.nn.functional.pad(t, (0, pad)) for t in (tokens, positions, past, prefix_len)]  # (B,) each
        self._limits()
        start = time.perf_counter()
        with self._inputs(key, real, padded[2], index, padded[3]):
            logits = self._fn(padded[0], padded[1])  # (B, V)
        if key not in self.graphs:
            self.graphs[key] = time.perf_counter() - start
        # A CUDA graph's output buffer is overwritten by its next replay: the caller keeps a copy.
        return logits[:n].clone() if self.cuda else logits[:n]

    def _limits(self) -> None:
        """Dynamo's recompile limits, raised to this engine's room in the calling thread: dynamo's config is per
        thread, and graphs compile on the engine's thread (the default limit, 8, would fail the 9th graph)."""
        cfg = torch._dynamo.config
        if cfg.recompile_limit < self._room or cfg.accumulated_recompile_limit < self._room:
            cfg.recompile_limit = max(cfg.recompile_limit, self._room)
            cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, self._room)

    def _real(self, B: int, n: int) -> torch.Tensor:
        """(B,) bool: rows 0..n-1 are the step's, the rest padding."""
        return self._rows[:B] < n

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The traced step: tokens, positions (B,) -> next-token logits (B, V) fp32."""
        h = self.body(input_ids=tokens[:, None], position_ids=positions[:, None], use_cache=False)
        return self.runner.lm_logits(h.last_hidden_state[:, -1])  # (B, V)

    @contextmanager
    def _inputs(
        self, key: Key, real: torch.Tensor, past: torch.Tensor, index: torch.Tensor, plen: torch.Tensor
    ) -> Iterator[None]:
        """Points attention.GRAPH at this step's tensors and the cache segments covering key.S positions; checks
        afterwards that every layer's attention ran once (as `serving` does)."""
        c, g = self.cache, GRAPH
        segs = [(i, s, min(c.k[i].shape[3], key.S - s)) for i, s in enumerate(c.starts) if s < key.S]
        g.pool, g.past, g.real, g.prefix_index, g.prefix_len = self.runner.pool, past, real, index, plen
        g.k, g.v = [c.k[i] for i, _, _ in segs], [c.v[i] for i, _, _ in segs]
        g.starts, g.used = tuple(s for _, s, _ in segs), tuple(w for _, _, w in segs)
        g.layer_index, g.calls = self._layer_index, [0] * c.L
        if self.cuda:  # CUDA graphs replay fixed addresses: the cache and pool are written in place, never copied in
            for t in [*g.k, *g.v, self.runner.pool.data]:
                torch._dynamo.mark_static_address(t)
        config = self.body.config
        previous, config._attn_implementation = config._attn_implementation, ATTN_NAME
        g.active = True
        try:
            yield
        finally:
            g.active = False
            config._attn_implementation = previous
            g.k, g.v = [], []
        if any(n != 1 for n in g.calls):
            raise AttentionBypassed(f"a compiled step ran the layers' attention {g.calls} times (each must run once)")

    # -- warm-up ---------------------------------------------------------------------------------------------------
    def warm_keys(self, prefix_lengths: Sequence[int] = (0,)) -> list[Key]:
        """The graphs the warm-up compiles: every batch bucket, at the prefix widths of `prefix_lengths` (the
        resident tasks'), reading the smallest slot-width bucket."""
        S = min(MIN_POW2_WIDTH, self.cache.max_width)
        Ps = sorted({prefix_bucket(p) for p in prefix_lengths})
        return [Key(B, P, S) for P in Ps for B in self.buckets]

    @torch.inference_mode()
    def warm(self, key: Key) -> float:
        """Compiles the key's graph (if it has none) on inputs that write only the scratch slot (every row padding),
        so it may run between any two steps; returns the seconds it took."""
        if key in self.graphs or key in self.failed or len(self.graphs) >= self.max_graphs:
            return 0.0
        self.cache.ensure_width(key.S)
        dev = self.runner.bb.device
        # Distinct tensors, as a step has: dynamo guards on which inputs alias each other.
        tokens, positions, past, plen = (torch.zeros(key.B, dtype=torch.long, device=dev) for _ in range(4))
        index = torch.zeros(key.B, key.P, dtype=torch.long, device=dev)
        real = torch.zeros(key.B, dtype=torch.bool, device=dev)
        self._limits()
        start = time.perf_counter()
        try:
            with self._inputs(key, real, past, index, plen):
                self._fn(tokens, positions)
        except AttentionBypassed:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. no C++ compiler for inductor: steps of this shape run eagerly
            self._failed(key, e)
            return 0.0
        self.graphs[key] = seconds = time.perf_counter() - start
        return seconds

    def warm_all(self, keys: Sequence[Key]) -> None:
        """Compiles `keys` one after another, reporting progress (a service runs them one per engine job instead,
        see Engine.warm_compiled)."""
        self.progress.buckets = len(keys)
        for key in keys:
            self.progress.seconds.append(self.warm(key))
            self.progress.warmed += 1
        self.progress.done = True
