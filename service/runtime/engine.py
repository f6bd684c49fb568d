"""The engine: owns the running batch and the device tier of prefixes, and executes one StepPlan at a time on its
worker thread.

A step (1) drops cancelled rows, (2) decodes one token for every running row, (3) prefills the admitted requests
in one mixed-task forward (classification rows included; they finish there), (4) samples, checks stop conditions
and detokenises, and (5) returns a StepOutput. New rows join the running batch at the end of the step, finished
ones leave at once: iteration-level scheduling.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from prefix_store import VersionKey

from .backbone import Backbone
from .batch import DecodeBatch, Row
from .lru import ByteLRU
from .output import TextStream, class_probabilities
from .runner import DevicePrefix, ModelRunner, PrefillItem
from .sampling import make_generator, sample, token_logprobs
from .step import EngineRequest, FinishReason, Kind, RowOutput, StepOutput, StepPlan

log = logging.getLogger(__name__)


class DeviceCache:
    """The device tier: prefixes ready to run, by (task, version), bounded by bytes. Rows hold their own reference,
    so an eviction never pulls tensors from under a running request. Invalidations may come from any thread and are
    applied at the start of the next step."""

    def __init__(self, capacity_bytes: int) -> None:
        self.lru: ByteLRU[VersionKey, DevicePrefix] = ByteLRU(capacity_bytes, lambda p: p.nbytes)
        self._pending: list[Callable[[VersionKey], bool]] = []
        self._lock = threading.Lock()

    def invalidate(self, task: str, version: int | None) -> None:
        with self._lock:
            self._pending.append(lambda key: key[0] == task and (version is None or key[1] == version))

    def apply_invalidations(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for match in pending:
            self.lru.drop(match)

    def __contains__(self, key: VersionKey) -> bool:
        return key in self.lru


class Engine:
    """Args:
    backbone: the frozen model.
    device_cache_bytes: capacity of the device prefix tier.
    """

    def __init__(self, backbone: Backbone, *, device_cache_bytes: int = 1024**3) -> None:
        self.bb = backbone
        self.runner = ModelRunner(backbone)
        self.device_cache = DeviceCache(device_cache_bytes)
        self.batch: DecodeBatch | None = None
        self.step_count = 0
        tok = backbone.tokenizer
        self.eos_ids: set[int] = set()
        if tok is not None and tok.eos_token_id is not None:
            self.eos_ids.add(tok.eos_token_id)
        gen_eos = getattr(getattr(backbone.model, "generation_config", None), "eos_token_id", None)
        self.eos_ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])

    # -- called from other threads ------------------------------------------------------------------------------
    def invalidate(self, task: str, version: int | None) -> None:
        """Drops the device copies of a task's version (or every version) at the start of the next step."""
        self.device_cache.invalidate(task, version)

    def is_resident(self, task: str, version: int) -> bool:
        return (task, version) in self.device_cache

    # -- state between steps ------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forgets the running batch (after a failed step its state cannot be trusted)."""
        self.batch = None

    @property
    def running(self) -> int:
        return 0 if self.batch is None else len(self.batch)

    @property
    def reserved_tokens(self) -> int:
        return 0 if self.batch is None else self.batch.reserved_tokens

    # -- the step -----------------------------------------------------------------------------------------------
    def step(self, plan: StepPlan) -> StepOutput:
        self.step_count += 1
        self.device_cache.apply_invalidations()
        outputs: list[RowOutput] = []
        if plan.cancel and self.batch is not None:
            rows = self.batch.rows
            outputs += [
                RowOutput(r.request_id, self.step_count, finish_reason=FinishReason.CANCELLED)
                for r in rows
                if r.request_id in plan.cancel
            ]
            self.batch = self.batch.filter([i for i, r in enumerate(rows) if r.request_id not in plan.cancel])
        if self.batch is not None:
            logits = self.runner.decode(self.batch.kv, self.batch.tokens)
            outs, keep = self._advance(self.batch, logits)
            outputs += outs
            self.batch = self.batch.filter(keep)
        admit = [r for r in plan.admit if r.request_id not in plan.cancel]
        if admit:
            outputs += self._prefill(admit)
        return StepOutput(self.step_count, outputs, self.running, self.reserved_tokens)

    def _prefill(self, admit: list[EngineRequest]) -> list[RowOutput]:
        outputs, items, reqs = [], [], []
        for req in admit:
            try:
                prefix = self._device_prefix(req)
            except Exception as e:  # a prefix the backbone refuses fails its own request, not the step
                outputs.append(RowOutput(req.request_id, self.step_count, finish_reason=FinishReason.ERROR, error=e))
                continue
            generate = req.kind is Kind.GENERATE
            items.append(PrefillItem(prefix, req.prompt_ids, req.token_type_ids, generate=generate))
            reqs.append(req)
        if not items:
            return outputs
        if self.bb.is_encoder:
            logits = self.runner.classify_encoder(items)
            return outputs + [self._classified(reqs[i], x) for i, x in logits.items()]
        room = max((r.params.max_new_tokens for r in reqs if r.params is not None), default=0)
        out = self.runner.prefill(items, decode_room=room)
        outputs += [self._classified(reqs[i], x) for i, x in out.class_logits.items()]
        if out.kv is None:
            return outputs
        rows = [
            Row(r, None if r.params.greedy else make_generator(r.params.seed, self.bb.device), self._text(r))
            for r in reqs
            if r.params is not None
        ]
        new = DecodeBatch(rows, out.kv, torch.zeros(len(rows), dtype=torch.long, device=self.bb.device))
        outs, keep = self._advance(new, out.logits)
        self.batch = DecodeBatch.concatenate(self.batch, new.filter(keep))
        return outputs + outs

    def _text(self, req: EngineRequest) -> TextStream:
        assert req.params is not None
        return TextStream(self.bb.tokenizer, req.params, self.eos_ids)

    def _classified(self, req: EngineRequest, logits: torch.Tensor) -> RowOutput:
        return RowOutput(
            req.request_id,
            self.step_count,
            finish_reason=FinishReason.STOP,
            probs=class_probabilities(logits),
            logits=logits,
        )

    # -- per-token bookkeeping ----------------------------------------------------------------------------------
    def _advance(self, batch: DecodeBatch, logits: torch.Tensor) -> tuple[list[RowOutput], list[int]]:
        """Samples one token per row from logits (B, V) into `batch.tokens`; returns the outputs and the rows still
        running."""
        rows = batch.rows
        params = [r.request.params for r in rows]
        tokens = sample(logits, params, [r.generator for r in rows])  # (B,)
        batch.tokens = tokens
        want_lp = any(p.logprobs for p in params)
        lps = token_logprobs(logits, tokens).tolist() if want_lp else [None] * len(rows)
        outputs, keep = [], []
        for i, (row, p, tok) in enumerate(zip(rows, params, tokens.tolist(), strict=True)):
            text, finish = row.text.push(tok)
            outputs.append(
                RowOutput(
                    row.request_id,
                    self.step_count,
                    token_id=tok,
                    text=text,
                    logprob=lps[i] if p.logprobs else None,
                    finish_reason=finish,
                    logits=logits[i].clone() if p.return_logits else None,
                )
            )
            if finish is None:
                keep.append(i)
        return outputs, keep

    def _device_prefix(self, req: EngineRequest) -> DevicePrefix | None:
        art = req.artifact
        if art is None:
            return None
        key = art.key
        entry = self.device_cache.lru.get(key)
        if entry is None:
            entry = self.runner.materialize(art)
            self.device_cache.lru.put(key, entry)
        return entry
