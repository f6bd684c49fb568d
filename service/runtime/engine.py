"""The engine: owns the running rows, the slot cache and the device tier of prefixes, and executes one StepPlan at a
time on its worker thread.

A step (1) drops cancelled rows, (2) decodes one token for every row whose prompt is prefilled, (3) admits the new
requests (each takes a slot), (4) prefills prompt chunks of any mix of tasks in one forward, at most
`max_prefill_tokens` tokens (a long prompt takes several steps, so decoding rows never pause longer than one
chunk), (5) samples, checks stop conditions and detokenises, and (6) returns a StepOutput. Classification rows
finish when their prompt is prefilled; generation rows join the decoders then. Iteration-level scheduling: rows join
and leave at every step.

Prefixes are loaded (`load`) between steps, before their requests are admitted; a prefix that a row holds is never
evicted, nor is one pinned for its task (`pin`: kept resident whatever the traffic), and `warm` loads one ahead of any
request (preloading at start) only into room nobody uses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from prefix_store import PrefixArtifact, VersionKey

from . import methods, table_budget, tracing
from .backbone import Backbone
from .batch import Row, RunningBatch
from .compiled import CompiledDecode, Key
from .errors import InputTooLong, PinRefused
from .grammar import Grammars, advance, constrain
from .heads import head_logits
from .kv_cache import BLOCK, PrefixPool, SlotCache
from .methods import DeviceParts
from .output import TextStream, class_probabilities
from .runner import Chunk, DevicePrefix, EncodeItem, ImageItem, ModelRunner
from .sampling import (
    TokenHistory,
    alternatives,
    forbid_ending,
    make_generator,
    penalise,
    sample,
)
from .step import EngineRequest, FinishReason, Kind, RowOutput, StepOutput, StepPlan

log = logging.getLogger(__name__)
SHRINK_AFTER = 200  # steps a slot segment stays allocated after the last row that needed it left


class DeviceFull(Exception):
    """The device budget cannot take a prefix now: everything it holds is in use by rows (or reserved for
    admission), or pinned (`pinned`: the device bytes pins hold). The request waits; it is not an error of the
    request.
    """

    def __init__(self, message: str, pinned: int = 0) -> None:
        super().__init__(message)
        self.pinned = pinned


class DeviceCache:
    """The device tier: prefixes ready to run, by (task, version), their key/values in the PrefixPool, their LoRA
    factors and IA3 vectors in the runner's per-row tables.

    One budget (`budget`, PREFIXSERVE_DEVICE_CACHE_BYTES) bounds the pool's used blocks and what those tables hold
    together (table_budget.py), whichever kind of task needs the room. An entry is held while any holder (a request
    waiting for admission, or a running row; both by request id) needs it, and is never evicted then. An entry
    pinned for its task (`pins`, one version per task) is never evicted either, until it is unpinned, another
    version of the task is pinned in its place, or its version is deleted; the device bytes pins hold (pool blocks,
    table rows) are bounded by `pin_fraction` of the budget (PinRefused past it), so the rest is always there for
    every other task and version (a canary, a `task@N`). Unheld, unpinned entries stay as a cache and leave least
    recently used first when a load needs room. Invalidations and releases may come from any thread; they are
    applied on the engine's thread at the next load or step; pins are set on that thread.
    """

    def __init__(self, pool: PrefixPool, runner: ModelRunner, pin_fraction: float = 0.5) -> None:
        self.pool = pool
        self.runner = runner
        # Whole blocks: a prefix's pool bytes are whole blocks too, so a pin fits exactly when its blocks do.
        self.pin_budget = int(pool.max_blocks * pin_fraction) * BLOCK * pool.token_bytes
        self.entries: OrderedDict[VersionKey, DevicePrefix] = OrderedDict()
        self.holders: dict[VersionKey, set[str]] = {}
        self.pins: dict[str, VersionKey] = {}  # task -> its version kept resident (never evicted while pinned)
        self.stats = {"hits": 0, "misses": 0, "evictions": 0}
        self.other_bytes = 0  # heads and encoder soft prompts, outside the budget
        # told (task, seconds) of each load a request waited for (metrics), on the engine's thread
        self.on_load: Callable[[str, float], None] | None = None
        self._pending: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    @property
    def resident_bytes(self) -> int:
        tables = self.runner.biases.nbytes + self.runner.low_rank.nbytes + self.runner.scales.nbytes
        return self.pool.used_bytes + self.other_bytes + tables

    def __contains__(self, key: VersionKey) -> bool:
        return key in self.entries

    # -- any thread ---------------------------------------------------------------------------------------------
    def invalidate(self, task: str, version: int | None) -> None:
        def drop() -> None:
            for key in [k for k in self.entries if k[0] == task and (version is None or k[1] == version)]:
                if self.pins.get(task) == key:  # a deleted version (or task) is not kept for anyone
                    del self.pins[task]
                if not self.holders.get(key):
                    self._evict(key)

        self._later(drop)

    def release_later(self, key: VersionKey, holder: str) -> None:
        self._later(lambda: self.release(key, holder))

    def _later(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._pending.append(fn)

    # -- the engine's thread ------------------------------------------------------------------------------------
    def apply_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for fn in pending:
            fn()

    def acquire(self, artifact: PrefixArtifact, holder: str) -> DevicePrefix:
        """The artifact's device prefix, loaded if needed, held for `holder`. Raises DeviceFull when it cannot be
        placed now, or the artifact's own error when the backbone refuses it. A holder that already holds it (a
        request loaded ahead of its admission) is not counted again."""
        key = artifact.key
        entry = self.entries.get(key)
        if entry is not None and holder in self.holders.get(key, ()):
            return entry
        if entry is None:
            self.stats["misses"] += 1
            start = time.perf_counter()
            entry = self._load(artifact)
            if self.on_load is not None:
                self.on_load(artifact.task, time.perf_counter() - start)
        else:
            self.stats["hits"] += 1
            self.entries.move_to_end(key)
        self.holders.setdefault(key, set()).add(holder)
        return entry

    def pin(self, artifact: PrefixArtifact) -> DevicePrefix:
        """Keeps the artifact's prefix resident for its task (loaded if needed) until `unpin`, or until another
        version of the task is pinned in its place (that one then stays as an ordinary cache entry). Raises
        PinRefused when the pins' device bytes (pool blocks and LoRA / IA3 table rows) would pass the pin budget,
        DeviceFull when rows hold the room now."""
        key, task = artifact.key, artifact.task
        entry = self.entries.get(key)
        parts = None
        if entry is None:
            parts = methods.load(self.runner.bb, artifact)
            needed = 0 if parts.kv is None else self.pool.bytes_for(parts.kv.shape[3])
            needed += table_budget.held_after(self.runner, table_budget.Adds.of(parts))
        else:
            needed = self.device_bytes(entry)
        others = sum(
            self.device_bytes(self.entries[k]) for t, k in self.pins.items() if t != task and k in self.entries
        )
        left = max(0, self.pin_budget - others)
        if needed > left:
            raise PinRefused(
                f"pinning {task!r} v{artifact.version} needs {needed} bytes of the device prefix cache; other pins "
                f"hold {others} of the {self.pin_budget} pins may hold (PREFIXSERVE_PIN_FRACTION of its "
                f"{self.budget}, PREFIXSERVE_DEVICE_CACHE_BYTES), {left} left: unpin another task or raise "
                "the budget",
                needed=needed,
                left=left,
            )
        old = self.pins.pop(task, None)  # the version it replaces may make room for it
        try:
            if entry is None:
                entry = self._load(artifact, parts)
            else:
                self.entries.move_to_end(key)
        except Exception:
            if old is not None and old in self.entries:
                self.pins[task] = old
            raise
        self.pins[task] = key
        return entry

    def unpin(self, task: str) -> None:
        """Lets the task's pinned version go back to being an ordinary cache entry (evictable)."""
        self.pins.pop(task, None)

    def warm(self, artifact: PrefixArtifact) -> bool:
        """Loads the artifact's prefix as an ordinary cache entry, held by no one, only into room nothing uses: True
        once it is resident; False when the budget would have to evict another entry for it (preloading stops
        there rather than pushing out what it loaded first)."""
        if artifact.key in self.entries:
            return True
        parts = methods.load(self.runner.bb, artifact)
        if self._after_load(parts) > self.budget:
            return False
        self._load(artifact, parts)
        return True

    @property
    def budget(self) -> int:
        """PREFIXSERVE_DEVICE_CACHE_BYTES, in whole pool blocks: the pool's used blocks and the LoRA / IA3 tables
        share it (each takes what its tasks need, up to all of it), so together they never pass it. Outside it:
        heads, encoder soft prompts and bias deltas (small), and the pool's grown storage beyond its used blocks
        (free blocks the next prefixes reuse; the pool does not shrink)."""
        return self.pool.max_bytes

    @property
    def used_bytes(self) -> int:
        """What the budget counts now: the pool's used blocks and what the LoRA / IA3 tables hold (padded rows, free
        rows included)."""
        return self.pool.used_bytes + table_budget.nbytes(self.runner)

    def pool_bytes(self, entry: DevicePrefix) -> int:
        """The pool bytes an entry holds (its blocks)."""
        return 0 if entry.index is None else self.pool.bytes_for(len(entry.index))

    def device_bytes(self, entry: DevicePrefix) -> int:
        """The budget bytes an entry holds: its pool blocks and its rows in the LoRA / IA3 tables (at their padded
        rank), what pins are counted in."""
        return self.pool_bytes(entry) + table_budget.held(self.runner, entry)

    def release(self, key: VersionKey, holder: str) -> None:
        held = self.holders.get(key)
        if held is not None:
            held.discard(holder)
            if not held:
                del self.holders[key]

    def _load(self, artifact: PrefixArtifact, parts: DeviceParts | None = None) -> DevicePrefix:
        if parts is None:
            parts = methods.load(self.runner.bb, artifact)  # checked against the backbone, on the device
        head = self.runner.head_tensors(artifact)
        self._make_room(artifact, parts)
        assert artifact.version is not None, "only stored versions are served"
        entry = DevicePrefix(
            artifact.task, artifact.version, artifact.method, artifact.num_virtual_tokens, None, parts.embeds, head
        )
        try:  # what it took goes back if a step of it fails (the device out of memory): a failed load leaks nothing
            if parts.kv is not None:
                entry.index = self.pool.alloc(parts.kv.shape[3])
                assert entry.index is not None, "_make_room left the blocks free"
                self.pool.write(entry.index, parts.kv)
            if parts.biases is not None:
                entry.bias_slot = self.runner.biases.alloc(parts.biases)
            if parts.low_rank is not None:
                entry.lora_slot = self.runner.low_rank.alloc(parts.low_rank)
            if parts.scales is not None:
                entry.scale_slot = self.runner.scales.alloc(parts.scales)
            if head is not None and head.token_ids is not None:
                entry.verbalizer = torch.tensor(head.token_ids, device=self.runner.bb.device)
        except BaseException:
            self._free(entry)
            raise
        if self.used_bytes > self.budget:  # table_budget's replay of the tables' growth no longer matches them
            self._free(entry)
            log.warning("device budget: %s took more table bytes than predicted (table_budget.py)", artifact.task)
            raise self._full(artifact)
        self.other_bytes += _nbytes(entry)
        self.entries[entry.key] = entry
        return entry

    def _after_load(self, parts: DeviceParts, gone: list[DevicePrefix] | None = None) -> int:
        """The budget's bytes once the entries `gone` are evicted and `parts` loaded."""
        gone = gone or []
        pool = self.pool.used_bytes - sum(self.pool_bytes(e) for e in gone)
        if parts.kv is not None:
            pool += self.pool.bytes_for(parts.kv.shape[3])
        return pool + table_budget.after(self.runner, table_budget.Adds.of(parts), gone)

    def _make_room(self, artifact: PrefixArtifact, parts: DeviceParts) -> None:
        """Evicts, least recently used first, entries that no holder needs and no pin keeps, until `parts` fit the
        budget beside what stays. Only an entry whose eviction frees budget bytes goes (its pool blocks, tables its
        rows alone kept, or the growth its free rows spare the new task): a prefix's load never pushes out LoRA tasks
        whose tables would stay the same. Raises InputTooLong when the parts alone would not fit the budget, and
        DeviceFull (the request waits) when evicting every such entry would not make the room."""
        adds = table_budget.Adds.of(parts)
        alone = table_budget.alone(self.runner.bb, adds)
        if parts.kv is not None:
            alone += self.pool.bytes_for(parts.kv.shape[3])
        if alone > self.budget:  # no eviction or wait would ever make room for it
            raise InputTooLong(
                f"{artifact.task!r} v{artifact.version} needs {alone} bytes: it does not fit the device cache at all "
                f"({self.budget}, PREFIXSERVE_DEVICE_CACHE_BYTES, which prefixes' pool blocks and LoRA / IA3 table "
                "rows share)"
            )
        now = self._after_load(parts)
        if now <= self.budget:
            return
        victims = [
            e
            for k, e in self.entries.items()  # least recently used first
            if not self.holders.get(k)
            and self.pins.get(k[0]) != k
            and (e.index is not None or e.lora_slot or e.scale_slot)
        ]
        if self._after_load(parts, victims) > self.budget:
            raise self._full(artifact)
        while now > self.budget:
            if not victims:  # every victim gone and still no room: table_budget's replay disagrees with the tables
                raise self._full(artifact)
            victim = next((e for e in victims if self._after_load(parts, [e]) < now), None)
            if victim is None:  # no one eviction frees bytes: tables several entries share go once all of them do
                victim = self._sharing_victim(victims)
            victims.remove(victim)
            self._evict(victim.key)
            self.stats["evictions"] += 1
            now = self._after_load(parts)

    def _full(self, artifact: PrefixArtifact) -> DeviceFull:
        pinned = sum(self.device_bytes(self.entries[k]) for k in self.pins.values() if k in self.entries)
        return DeviceFull(
            f"no room on the device for {artifact.task!r} v{artifact.version} now (pins hold {pinned} of "
            f"{self.budget} bytes)",
            pinned=pinned,
        )

    def _sharing_victim(self, victims: list[DevicePrefix]) -> DevicePrefix:
        """The least recently used victim with rows in a table that goes once the victims leave (every task with
        rows in it is one of them): such a table takes several evictions, none of which frees bytes alone. The first
        victim if there is none (not expected: every other way an eviction frees bytes shows in it alone)."""
        keys = {id(e): table_budget.keys_of(self.runner, e) for e in victims}
        by_victims = Counter(k for ks in keys.values() for k in ks)
        users = table_budget.users(self.runner)
        return next((e for e in victims if any(users[k] == by_victims[k] for k in keys[id(e)])), victims[0])

    def _evict(self, key: VersionKey) -> None:
        entry = self.entries.pop(key)
        self._free(entry)
        self.other_bytes -= _nbytes(entry)

    def _free(self, entry: DevicePrefix) -> None:
        """Gives back what an entry holds: its pool blocks and its slots in the per-row tables."""
        if entry.index is not None:
            self.pool.release(entry.index)
        self.runner.biases.release(entry.bias_slot)
        self.runner.low_rank.release(entry.lora_slot)
        self.runner.scales.release(entry.scale_slot)


def _nbytes(entry: DevicePrefix) -> int:
    """Device bytes an entry holds outside the pool (its bias deltas, LoRA factors and IA3 vectors are counted by
    the per-row tables' sizes)."""
    ts = [entry.soft_prompt] + ([entry.head.weight, entry.head.bias] if entry.head is not None else [])
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


class Engine:
    """Args:
    backbone: the frozen model.
    device_cache_bytes: the device memory for prefixes (held and cached).
    max_rows: the most rows running at once (the slot cache's size).
    max_prefill_tokens: the most prompt tokens prefilled in one step.
    pin_fraction: the most of the device prefix budget pinned tasks may hold (DeviceCache).
    compile: decode steps through torch.compile'd graphs on bucketed shapes (compiled.py; causal LMs only): the
        slot cache then grows in powers of two and the prefix pool takes its whole budget at start.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        device_cache_bytes: int = 1024**3,
        max_rows: int = 32,
        max_prefill_tokens: int = 8192,
        pin_fraction: float = 0.5,
        compile: bool = False,
    ) -> None:
        self.bb = backbone
        fp, dt, dev = backbone.fingerprint, backbone.dtype, backbone.device
        self.pool = PrefixPool(fp, dtype=dt, device=dev, max_bytes=device_cache_bytes)
        self.cache = None
        if not backbone.is_encoder:
            width = backbone.max_positions or 4096
            self.cache = SlotCache(
                fp,
                rows=max_rows,
                max_width=width,
                dtype=dt,
                device=dev,
                windows=backbone.windows,
                pow2=compile,
                scratch=compile,
            )
        self.runner = ModelRunner(backbone, self.pool, self.cache)
        self.compiled: CompiledDecode | None = None
        if compile and self.cache is not None:
            self.pool.reserve()  # the graphs specialise on the pool's shape
            self.compiled = CompiledDecode(self.runner)
        self.device_cache = DeviceCache(self.pool, self.runner, pin_fraction)
        self.batch = RunningBatch(self.cache) if self.cache is not None else None
        self.max_rows = max_rows
        self.max_prefill_tokens = max_prefill_tokens
        self.step_count = 0
        self._unneeded_since: int | None = None
        tok = backbone.tokenizer
        self.eos_ids: set[int] = set()
        if tok is not None and tok.eos_token_id is not None:
            self.eos_ids.add(tok.eos_token_id)
        width = getattr(backbone.lm_head, "out_features", None) or backbone.fingerprint.vocab_size
        self.grammars = Grammars(tok, width)
        gen_eos = getattr(getattr(backbone.model, "generation_config", None), "eos_token_id", None)
        self.eos_ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])

    # -- called from other threads ------------------------------------------------------------------------------
    def invalidate(self, task: str, version: int | None) -> None:
        """Drops the device copies of a task's version (or every version) once no row holds them."""
        self.device_cache.invalidate(task, version)

    def is_resident(self, task: str, version: int) -> bool:
        return (task, version) in self.device_cache

    def release(self, artifact: PrefixArtifact, holder: str) -> None:
        """A request that was loaded for but will not be admitted (cancelled, expired) lets its prefix go."""
        self.device_cache.release_later(artifact.key, holder)

    @property
    def pins(self) -> dict[str, int]:
        """task -> its version pinned resident (a copy, safe to read from any thread)."""
        return {task: key[1] for task, key in list(self.device_cache.pins.items())}

    # -- kept resident (on the engine's thread, between steps: see Scheduler.on_engine) ---------------------------
    @torch.inference_mode()
    def pin(self, artifact: PrefixArtifact) -> int:
        """Pins the artifact's prefix resident for its task (DeviceCache.pin); returns the device bytes it holds
        (pool blocks and LoRA / IA3 table rows, what pins are counted in)."""
        self.device_cache.apply_pending()
        return self.device_cache.device_bytes(self.device_cache.pin(artifact))

    def unpin(self, task: str) -> None:
        self.device_cache.apply_pending()
        self.device_cache.unpin(task)

    @torch.inference_mode()
    def warm(self, artifact: PrefixArtifact) -> bool:
        """Loads the artifact's prefix ahead of any request if it fits without evicting (DeviceCache.warm)."""
        self.device_cache.apply_pending()
        return self.device_cache.warm(artifact)

    # -- compiled decode (on the engine's thread, between steps) ---------------------------------------------------
    def compile_keys(self) -> list[Key]:
        """The graphs a warm-up compiles (CompiledDecode.warm_keys) at the prefix widths of the resident tasks and
        none; [] without compile."""
        if self.compiled is None:
            return []
        return self.compiled.warm_keys([0, *(e.kv_len for e in self.device_cache.entries.values())])

    def warm_compiled(self, key: Key) -> float:
        """Compiles one graph (seconds taken; 0 if it had one)."""
        assert self.compiled is not None
        return self.compiled.warm(key)

    # -- state between steps ------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forgets the running rows (after a failed step their state cannot be trusted)."""
        if self.batch is not None:
            for row in self.batch.rows:
                self._let_go(row)
            self.batch = RunningBatch(self.batch.cache)

    @property
    def running(self) -> int:
        return 0 if self.batch is None else len(self.batch.rows)

    @property
    def reserved_tokens(self) -> int:
        return 0 if self.batch is None else self.batch.reserved_tokens

    # -- loading (between steps) --------------------------------------------------------------------------------
    @torch.inference_mode()
    def load(self, requests: list[EngineRequest]) -> dict[str, Exception | None]:
        """Makes each request's prefix resident and held for it, ahead of its admission. Per request id: None
        (held), DeviceFull (no room now: try again later), or the error that fails the request."""
        self.device_cache.apply_pending()
        out: dict[str, Exception | None] = {}
        for req in requests:
            if req.artifact is None:
                out[req.request_id] = None
                continue
            try:
                self.device_cache.acquire(req.artifact, req.request_id)
                out[req.request_id] = None
            except Exception as e:  # DeviceFull, or a prefix the backbone refuses
                out[req.request_id] = e
        return out

    # -- the step -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, plan: StepPlan) -> StepOutput:
        if not tracing.enabled():
            return self._step(plan)
        with tracing.tracer("prefix_serve.engine").start_as_current_span("engine.step") as span:
            out = self._step(plan)
            span.set_attributes(
                {
                    "prefixserve.step": out.step,
                    "prefixserve.admitted": len(plan.admit),
                    "prefixserve.cancelled": len(plan.cancel),
                    "prefixserve.running": out.running,
                    "prefixserve.outputs": len(out.rows),
                }
            )
            return out

    def _step(self, plan: StepPlan) -> StepOutput:
        self.step_count += 1
        self.device_cache.apply_pending()
        if self.batch is None:
            admit = [r for r in plan.admit if r.request_id not in plan.cancel]
            return StepOutput(self.step_count, self._classify_encoder(admit))
        b = self.batch
        outputs: list[RowOutput] = []
        if plan.cancel:
            gone = [r for r in b.rows if r.request_id in plan.cancel]
            outputs += [self._out(r.request_id, finish_reason=FinishReason.CANCELLED) for r in gone]
            self._end(gone)
        if b.decoding:
            outputs += self._decode()
        for req in plan.admit:
            if req.request_id in plan.cancel:
                continue
            row = self._admit(req, outputs)
            if row is not None and not (req.group is not None and b.add_fork(row, req.group)):
                b.add_prefilling(row)
        if b.prefilling:
            outputs += self._prefill()
        return StepOutput(self.step_count, outputs, len(b.rows), b.reserved_tokens)

    def _admit(self, req: EngineRequest, outputs: list[RowOutput]) -> Row | None:
        try:
            prefix = self.device_cache.acquire(req.artifact, req.request_id) if req.artifact is not None else None
        except Exception as e:  # a prefix the backbone refuses fails its own request, not the step
            outputs.append(self._out(req.request_id, finish_reason=FinishReason.ERROR, error=e))
            return None
        row = Row(req, prefix)
        if req.kind is Kind.GENERATE:
            p = req.params
            assert p is not None
            row.generator = None if p.greedy else make_generator(p.seed)
            row.text = TextStream(self.bb.tokenizer, p, self.eos_ids)
            if p.grammar is not None:
                try:
                    row.matcher = self.grammars.matcher(p.grammar)
                except Exception as e:  # a grammar that compiled but does not start fails its own request
                    self._let_go(row)
                    outputs.append(self._out(req.request_id, finish_reason=FinishReason.ERROR, error=e))
                    return None
        assert self.cache is not None
        self.cache.ensure_width(min(req.reserved_tokens - row.kv_len, self.cache.max_width))
        return row

    def _decode(self) -> list[RowOutput]:
        b = self.batch
        assert b is not None
        n = len(b.decoding)
        index, plen = b.decode_prefix()
        adapted = any(r.prefix is not None and any(r.prefix.table_slots) for r in b.decoding)
        slots = b.table_slots[:n] if adapted else None  # (n, 3): bias, low-rank and scale slots
        names = [r.prefix.key if r.prefix is not None and r.prefix.kv_len else None for r in b.decoding]  # slot order
        decode = self.runner.decode if self.compiled is None else self.compiled.decode
        logits = decode(b.tokens[:n], b.positions[:n], b.lengths[:n], index, plen, slots, names)
        history = None
        if b.counts is not None and b.seen is not None and any(r.params.counts_tokens for r in b.decoding):
            history = TokenHistory(b.counts[:n], b.seen[:n])  # decoders sit in slots 0..n-1: views, no gather
        outputs, finished, tokens = self._sample(b.decoding, logits, history)
        b.advance(tokens)
        self._end(finished)
        return outputs

    def _prefill(self) -> list[RowOutput]:
        """Prefills the next chunks of the prefilling rows, in admission order, within the step's token budget."""
        b = self.batch
        assert b is not None
        budget, chunks, rows = self.max_prefill_tokens, [], []
        for row in b.prefilling:
            if budget <= 0:
                break
            take = min(row.prompt_len - row.done, budget)
            ids = row.request.prompt_ids[row.done : row.done + take]
            final = row.done + take == row.prompt_len
            head = None if row.generates or row.prefix is None else row.prefix.head
            pool_mean = head is not None and head.pooling == "mean"
            states = row.generates and row.params.prompt_logprobs
            chunks.append(Chunk(row.slot, row.done, ids, row.prefix, final, pool_mean=pool_mean, states=states))
            rows.append(row)
            budget -= take
        results = self.runner.prefill(chunks)
        outputs: list[RowOutput] = []
        gen_rows, gen_states, ended = [], [], []
        for row, chunk, res in zip(rows, chunks, results, strict=True):
            if res.states is not None:
                self._prompt_logprobs(row, chunk, res.states)
            row.done += len(chunk.ids)
            b.lengths[row.slot] = row.done
            if res.hidden_sum is not None:
                row.hidden_sum = res.hidden_sum if row.hidden_sum is None else row.hidden_sum + res.hidden_sum
            if not chunk.final:
                continue
            assert res.last is not None
            if row.generates:
                gen_rows.append(row)
                gen_states.append(res.last)
                for sibling in b.fork(row):  # the other choices of this prompt: same state, their own draws
                    sibling.prompt_logprobs = None if row.prompt_logprobs is None else list(row.prompt_logprobs)
                    gen_rows.append(sibling)
                    gen_states.append(res.last)
            else:
                mean = row.hidden_sum / row.prompt_len if row.hidden_sum is not None else res.last
                assert row.prefix is not None and row.prefix.head is not None, "classification rows have a head"
                outputs.append(self._classified(row.request, head_logits(row.prefix.head, mean, res.last)))
                ended.append(row)
        self._end(ended)
        if gen_rows:
            logits = self.runner.lm_logits(torch.stack(gen_states))  # (n, V)
            history = None
            if any(r.params.counts_tokens for r in gen_rows):
                b.ensure_history(logits.shape[-1])
                history = first_history(gen_rows, logits.shape[-1], logits.device)
            outs, finished, tokens = self._sample(gen_rows, logits, history)
            for row, out in zip(gen_rows, outs, strict=True):
                out.prompt_logprobs = row.prompt_logprobs
            outputs += outs
            self._end(finished)
            done = {id(r) for r in finished}
            for row, tok in zip(gen_rows, tokens.tolist(), strict=True):
                if id(row) not in done:
                    b.start_decoding(row, tok)
        return outputs

    def _classify_encoder(self, admit: list[EngineRequest]) -> list[RowOutput]:
        outputs: list[RowOutput] = []
        images: list[ImageItem] = []
        texts: list[EncodeItem] = []
        reqs = []
        for req in admit:
            try:
                prefix = self.device_cache.acquire(req.artifact, req.request_id) if req.artifact else None
            except Exception as e:
                outputs.append(self._out(req.request_id, finish_reason=FinishReason.ERROR, error=e))
                continue
            embed = req.kind is Kind.EMBED
            if req.pixel_values is not None:
                images.append(ImageItem(prefix, req.pixel_values, embed))
            else:
                texts.append(EncodeItem(prefix, req.prompt_ids, req.token_type_ids, embed))
            reqs.append(req)
        if reqs:  # an image backbone's requests all carry an image, a text encoder's none
            xs = self.runner.classify_images(images) if self.bb.is_image else self.runner.classify_encoder(texts)
            for req, x in zip(reqs, xs, strict=True):
                if req.kind is Kind.EMBED:  # x: the pooled state (hidden,)
                    emb = torch.nn.functional.normalize(x, dim=0)
                    outputs.append(self._out(req.request_id, finish_reason=FinishReason.STOP, embedding=emb))
                else:  # x: head logits (C,)
                    outputs.append(self._classified(req, x))
        for req in reqs:
            if req.artifact is not None:
                self.device_cache.release(req.artifact.key, req.request_id)
        return outputs

    # -- per-token bookkeeping ----------------------------------------------------------------------------------
    def _sample(
        self, rows: list[Row], logits: torch.Tensor, history: TokenHistory | None
    ) -> tuple[list[RowOutput], list[Row], torch.Tensor]:
        """Samples one token per row from logits (B, V): penalties (from the rows' token history), the minimum
        length, then each row's sampler. Returns the outputs, the rows that finished, the tokens. Log-probabilities
        are the model's own (raw logits)."""
        params = [r.params for r in rows]
        # What needs the model's own distribution is taken first; then the transforms work in place on the logits.
        want = [i for i, p in enumerate(params) if p.logprobs or p.top_logprobs]  # only these rows pay for it
        idx = torch.tensor(want, device=logits.device)
        raw_lp = torch.log_softmax(logits[idx].float(), dim=-1) if want else None  # (n, V)
        raw = {i: logits[i].clone() for i, p in enumerate(params) if p.return_logits}
        x = penalise(logits.float(), params, history)
        young = [  # rows under min_tokens: their stop ids (EOS unless ignore_eos) are held back
            (i, sorted(row.stream.stop_ids))
            for i, (row, p) in enumerate(zip(rows, params, strict=True))
            if p.min_tokens and len(row.stream.token_ids) < p.min_tokens
        ]
        if any(ids for _, ids in young):
            x = forbid_ending(x, young)
        matchers = [r.matcher for r in rows]
        failed = constrain(x, matchers) if any(m is not None for m in matchers) else {}
        tokens = sample(x, params, [r.generator for r in rows])  # (B,)
        if any(m is not None for m in matchers):
            advance(matchers, tokens.tolist())
        lps: list[float | None] | None = None
        tops: list[list[tuple[int, float]] | None] | None = None
        if raw_lp is not None:
            chosen = raw_lp.gather(1, tokens[idx][:, None])[:, 0].tolist()
            lps = [None] * len(rows)
            for j, i in enumerate(want):
                lps[i] = chosen[j]
            k = max(p.top_logprobs for p in params)
            if k:
                tops = [None] * len(rows)
                for j, alts in enumerate(alternatives(raw_lp, k)):
                    tops[want[j]] = alts
        outputs, finished = [], []
        for i, (row, p, tok) in enumerate(zip(rows, params, tokens.tolist(), strict=True)):
            if i in failed:  # its grammar failed mid-output: the row ends with the error, not with a token
                outputs.append(self._out(row.request_id, finish_reason=FinishReason.ERROR, error=failed[i]))
                finished.append(row)
                continue
            text, finish = row.stream.push(tok)
            top = tops[i] if tops is not None else None  # set for every row that asked for top_logprobs
            outputs.append(
                self._out(
                    row.request_id,
                    token_id=tok,
                    text=text,
                    logprob=lps[i] if lps is not None and p.logprobs else None,
                    top_logprobs=top[: p.top_logprobs] if top is not None and p.top_logprobs else None,
                    finish_reason=finish,
                    logits=raw.get(i),
                )
            )
            if finish is not None:
                finished.append(row)
        return outputs, finished, tokens

    def _prompt_logprobs(self, row: Row, chunk: Chunk, states: torch.Tensor) -> None:
        """Appends the log-probabilities of the prompt tokens this chunk's states predict (T_chunk, hidden): state j
        predicts prompt token done + j + 1. The first prompt token has none (None)."""
        p = row.request.params
        assert p is not None
        ids = row.request.prompt_ids
        if row.prompt_logprobs is None:
            row.prompt_logprobs = [None]
        targets = ids[row.done + 1 : row.done + 1 + len(chunk.ids)]  # the final chunk's last state predicts none
        for start in range(0, len(targets), 256):  # (256, V) logits at a time, whatever the prompt's length
            part = targets[start : start + 256]
            lp = torch.log_softmax(self.runner.lm_logits(states[start : start + len(part)]), dim=-1)  # (n, V)
            chosen = lp.gather(1, torch.tensor(part, device=lp.device)[:, None])[:, 0].tolist()
            tops = alternatives(lp, p.top_logprobs) if p.top_logprobs else [[] for _ in part]
            row.prompt_logprobs.extend(zip(chosen, tops, strict=True))

    def _classified(self, req: EngineRequest, logits: torch.Tensor) -> RowOutput:
        return self._out(
            req.request_id, finish_reason=FinishReason.STOP, probs=class_probabilities(logits), logits=logits
        )

    def _out(self, request_id: str, **kw: Any) -> RowOutput:
        return RowOutput(request_id, self.step_count, **kw)

    def _end(self, rows: list[Row]) -> None:
        if not rows:
            return
        assert self.batch is not None and self.cache is not None
        self.batch.remove(rows)
        for row in rows:
            self._let_go(row)
        self._maybe_shrink()

    def _maybe_shrink(self) -> None:
        """Drops slot segments no running row needs once they have gone unneeded for SHRINK_AFTER steps, so a
        burst of long prompts does not allocate and free the same segments over and over."""
        assert self.batch is not None and self.cache is not None
        needed = max((r.request.reserved_tokens - r.kv_len for r in self.batch.rows), default=0)
        if needed >= self.cache.width:
            self._unneeded_since = None
        elif self._unneeded_since is None:
            self._unneeded_since = self.step_count
        elif self.step_count - self._unneeded_since >= SHRINK_AFTER:
            self.cache.shrink(needed)
            self._unneeded_since = None

    def _let_go(self, row: Row) -> None:
        if row.prefix is not None:
            self.device_cache.release(row.prefix.key, row.request_id)


def first_history(rows: list[Row], vocab: int, device: torch.device) -> TokenHistory:
    """The token history of rows about to draw their first token: nothing generated, their prompts seen."""
    counts = torch.zeros(len(rows), vocab, dtype=torch.float32, device=device)
    seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
    for i, row in enumerate(rows):  # once per row in its life
        seen[i, row.request.prompt_ids] = True
    return TokenHistory(counts, seen)
