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
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from prefix_store import PrefixArtifact, VersionKey

from . import methods, tracing
from .backbone import Backbone
from .batch import Row, RunningBatch
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
    admission), or pinned (`pinned`: the pool bytes pins hold). The request waits; it is not an error of the request.
    """

    def __init__(self, message: str, pinned: int = 0) -> None:
        super().__init__(message)
        self.pinned = pinned


class DeviceCache:
    """The device tier: prefixes ready to run, by (task, version), their key/values in the PrefixPool.

    An entry is held while any holder (a request waiting for admission, or a running row; both by request id) needs
    it, and is never evicted then. An entry pinned for its task (`pins`, one version per task) is never evicted
    either, until it is unpinned, another version of the task is pinned in its place, or its version is deleted;
    the pool bytes pins hold are bounded by `pin_fraction` of the pool's budget (PinRefused past it), so the rest is
    always there for every other task and version (a canary, a `task@N`). Unheld, unpinned entries stay as
    a cache and leave least recently used first when the pool needs room. Invalidations and releases may come from
    any thread; they are applied on the engine's thread at the next load or step; pins are set on that thread.
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
        self.other_bytes = 0  # heads and encoder soft prompts, outside the pool
        # told (task, seconds) of each load a request waited for (metrics), on the engine's thread
        self.on_load: Callable[[str, float], None] | None = None
        self._pending: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    @property
    def resident_bytes(self) -> int:
        return self.pool.used_bytes + self.other_bytes + self.runner.biases.nbytes

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
        PinRefused when the pins' pool bytes would pass the pin budget, DeviceFull when rows hold the room now."""
        key, task = artifact.key, artifact.task
        entry = self.entries.get(key)
        parts = None
        if entry is None:
            parts = methods.load(self.runner.bb, artifact)
            needed = 0 if parts.kv is None else self.pool.bytes_for(parts.kv.shape[3])
        else:
            needed = self.pool_bytes(entry)
        others = sum(self.pool_bytes(self.entries[k]) for t, k in self.pins.items() if t != task and k in self.entries)
        left = max(0, self.pin_budget - others)
        if needed > left:
            raise PinRefused(
                f"pinning {task!r} v{artifact.version} needs {needed} bytes of the device prefix cache; other pins "
                f"hold {others} of the {self.pin_budget} pins may hold (PREFIXSERVE_PIN_FRACTION of its "
                f"{self.pool.max_bytes}, PREFIXSERVE_DEVICE_CACHE_BYTES), {left} left: unpin another task or raise "
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
        once it is resident; False when the pool would have to evict another prefix for it (preloading stops
        there rather than pushing out what it loaded first)."""
        if artifact.key in self.entries:
            return True
        parts = methods.load(self.runner.bb, artifact)
        if parts.kv is not None and self.pool.blocks_for(parts.kv.shape[3]) > self.pool.free_blocks:
            return False
        self._load(artifact, parts)
        return True

    def pool_bytes(self, entry: DevicePrefix) -> int:
        """The pool bytes an entry holds (its blocks), what pins are counted in."""
        return 0 if entry.index is None else self.pool.bytes_for(len(entry.index))

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
        kv, soft = parts.kv, parts.embeds
        index = None
        if kv is not None:
            P = kv.shape[3]
            if self.pool.blocks_for(P) > self.pool.max_blocks:  # no eviction or wait would ever make room for it
                raise InputTooLong(
                    f"the prefix of {artifact.task!r} v{artifact.version} needs {self.pool.bytes_for(P)} bytes: it "
                    f"does not fit the device cache at all ({self.pool.max_bytes}, PREFIXSERVE_DEVICE_CACHE_BYTES)"
                )
            index = self.pool.alloc(P)
            while index is None and self._evict_one():
                index = self.pool.alloc(P)
            if index is None:
                pinned = sum(self.pool_bytes(self.entries[k]) for k in self.pins.values() if k in self.entries)
                raise DeviceFull(
                    f"no room on the device for {artifact.task!r} v{artifact.version} now (pins hold {pinned} of "
                    f"{self.pool.max_bytes} bytes)",
                    pinned=pinned,
                )
            self.pool.write(index, kv)
        assert artifact.version is not None, "only stored versions are served"
        entry = DevicePrefix(
            artifact.task, artifact.version, artifact.method, artifact.num_virtual_tokens, index, soft, head
        )
        if parts.biases is not None:
            entry.bias_slot = self.runner.biases.alloc(parts.biases)
        if head is not None and head.token_ids is not None:
            entry.verbalizer = torch.tensor(head.token_ids, device=self.runner.bb.device)
        self.other_bytes += _nbytes(entry)
        self.entries[entry.key] = entry
        return entry

    def _evict_one(self) -> bool:
        for key in self.entries:  # least recently used first
            if not self.holders.get(key) and self.pins.get(key[0]) != key:
                self._evict(key)
                self.stats["evictions"] += 1
                return True
        return False

    def _evict(self, key: VersionKey) -> None:
        entry = self.entries.pop(key)
        if entry.index is not None:
            self.pool.release(entry.index)
        self.runner.biases.release(entry.bias_slot)
        self.other_bytes -= _nbytes(entry)


def _nbytes(entry: DevicePrefix) -> int:
    """Device bytes an entry holds outside the pool (its bias deltas are counted by the bias table's size)."""
    ts = [entry.soft_prompt] + ([entry.head.weight, entry.head.bias] if entry.head is not None else [])
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


class Engine:
    """Args:
    backbone: the frozen model.
    device_cache_bytes: the device memory for prefixes (held and cached).
    max_rows: the most rows running at once (the slot cache's size).
    max_prefill_tokens: the most prompt tokens prefilled in one step.
    pin_fraction: the most of the device prefix budget pinned tasks may hold (DeviceCache).
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        device_cache_bytes: int = 1024**3,
        max_rows: int = 32,
        max_prefill_tokens: int = 8192,
        pin_fraction: float = 0.5,
    ) -> None:
        self.bb = backbone
        fp, dt, dev = backbone.fingerprint, backbone.dtype, backbone.device
        self.pool = PrefixPool(fp, dtype=dt, device=dev, max_bytes=device_cache_bytes)
        self.cache = None
        if not backbone.is_encoder:
            width = backbone.max_positions or 4096
            self.cache = SlotCache(fp, rows=max_rows, max_width=width, dtype=dt, device=dev, windows=backbone.windows)
        self.runner = ModelRunner(backbone, self.pool, self.cache)
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
        """Pins the artifact's prefix resident for its task (DeviceCache.pin); returns the pool bytes it holds."""
        self.device_cache.apply_pending()
        return self.device_cache.pool_bytes(self.device_cache.pin(artifact))

    def unpin(self, task: str) -> None:
        self.device_cache.apply_pending()
        self.device_cache.unpin(task)

    @torch.inference_mode()
    def warm(self, artifact: PrefixArtifact) -> bool:
        """Loads the artifact's prefix ahead of any request if it fits without evicting (DeviceCache.warm)."""
        self.device_cache.apply_pending()
        return self.device_cache.warm(artifact)

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
        bias_slots = b.bias_slot[:n] if any(r.prefix is not None and r.prefix.bias_slot for r in b.decoding) else None
        names = [r.prefix.key if r.prefix is not None and r.prefix.kv_len else None for r in b.decoding]  # slot order
        logits = self.runner.decode(b.tokens[:n], b.positions[:n], b.lengths[:n], index, plen, bias_slots, names)
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
