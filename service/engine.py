"""The engine: owns the running batch and executes one scheduled step at a time on its worker thread.

A step (1) drops cancelled rows, (2) decodes one token for every running row, (3) prefills the admitted
requests in one mixed-task forward (classification rows included; they finish there), (4) samples, checks stop
conditions and detokenises, and (5) returns plain events. New rows join the running batch at the end of the step,
finished ones leave at once: iteration-level scheduling.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from prefix_store import PrefixArtifact

from .backbone import Backbone
from .batch import DecodeBatch
from .lru import ByteLRU
from .runner import DevicePrefix, ModelRunner, PrefillItem
from .sampling import SamplingParams, make_generator, sample, token_logprobs

log = logging.getLogger(__name__)


@dataclass
class EngineRequest:
    """One request as the engine sees it: everything resolved, nothing left to look up."""

    request_id: str
    prompt_ids: list[int]
    artifact: PrefixArtifact | None  # the exact task version to run; None: the bare backbone
    params: SamplingParams | None = None  # generation; None: classification
    token_type_ids: list[int] | None = None

    @property
    def key(self) -> tuple[str, int] | None:
        a = self.artifact
        return None if a is None else (a.task, a.version)  # type: ignore[return-value]


@dataclass
class Event:
    """What a step produced for one request. A generation request gets one per token; `finish_reason` is set on
    its last. A classification request gets exactly one, with `probs`. `error` ends a request that failed."""

    request_id: str
    token_id: int | None = None
    text: str = ""  # new text since the previous event (held back while it could still become a stop string)
    logprob: float | None = None
    finish_reason: str | None = None  # "length" | "stop" | "cancelled" | "error"
    probs: list[float] | None = None
    logits: torch.Tensor | None = None  # (V,) with SamplingParams.return_logits; (C,) head logits when classifying
    error: Exception | None = None
    step: int = 0  # the engine step that produced it


@dataclass
class _Row:
    req: EngineRequest
    params: SamplingParams
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the decoded output already sent


def _classified(request_id: str, logits: torch.Tensor, step: int) -> Event:
    probs = torch.softmax(logits, dim=-1).tolist()
    return Event(request_id, probs=probs, logits=logits, finish_reason="stop", step=step)


class Engine:
    """Args:
    backbone: the frozen model.
    device_cache_bytes: capacity of the device prefix LRU.
    """

    def __init__(self, backbone: Backbone, *, device_cache_bytes: int = 1024**3) -> None:
        self.bb = backbone
        self.runner = ModelRunner(backbone)
        # Device-resident prefixes by (task, version). Rows hold their own reference, so an eviction never pulls
        # tensors from under a running request.
        self.prefixes: ByteLRU[tuple[str, int], DevicePrefix] = ByteLRU(device_cache_bytes, lambda p: p.nbytes)
        self.batch: DecodeBatch | None = None
        self._tokens: torch.Tensor | None = None  # (B,) the token each running row feeds next
        self._invalidations: list[Any] = []
        self.step_count = 0
        self._lock = threading.Lock()
        tok = backbone.tokenizer
        self.eos_ids = set()
        if tok is not None and tok.eos_token_id is not None:
            self.eos_ids.add(tok.eos_token_id)
        gen_eos = getattr(getattr(backbone.model, "generation_config", None), "eos_token_id", None)
        self.eos_ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])

    # -- called from other threads ------------------------------------------------------------------------------
    def invalidate(self, match: Any) -> None:
        """Queue removal of device prefixes whose (task, version) key matches; applied at the next step."""
        with self._lock:
            self._invalidations.append(match)

    def is_resident(self, task: str, version: int) -> bool:
        return (task, version) in self.prefixes

    def reset(self) -> None:
        """Forgets the running batch (after a failed step its state cannot be trusted)."""
        self.batch, self._tokens = None, None

    @property
    def running(self) -> int:
        return 0 if self.batch is None else len(self.batch)

    # -- the step -----------------------------------------------------------------------------------------------
    def step(self, admit: list[EngineRequest], cancel: set[str]) -> list[Event]:
        self.step_count += 1
        with self._lock:
            invalidations, self._invalidations = self._invalidations, []
        for match in invalidations:
            self.prefixes.drop(match)
        events: list[Event] = []
        if cancel and self.batch is not None:
            rows = self.batch.rows
            events += [Event(r.req.request_id, finish_reason="cancelled") for r in rows if r.req.request_id in cancel]
            self._keep([i for i, r in enumerate(rows) if r.req.request_id not in cancel], self._tokens)
        if self.batch is not None:
            logits = self.runner.decode(self.batch, self._tokens)
            evs, keep, tokens = self._advance(self.batch.rows, logits)
            events += evs
            self._keep(keep, tokens)
        admit = [r for r in admit if r.request_id not in cancel]
        if admit:
            events += self._prefill(admit)
        return events

    def _prefill(self, admit: list[EngineRequest]) -> list[Event]:
        events, items, reqs = [], [], []
        for req in admit:
            try:
                prefix = self._device_prefix(req)
            except Exception as e:  # a prefix the backbone refuses fails its own request, not the step
                events.append(Event(req.request_id, finish_reason="error", error=e, step=self.step_count))
                continue
            items.append(PrefillItem(prefix, req.prompt_ids, req.token_type_ids, generate=req.params is not None))
            reqs.append(req)
        if not items:
            return events
        if self.bb.is_encoder:
            logits = self.runner.classify_encoder(items)
            return events + [_classified(reqs[i].request_id, x, self.step_count) for i, x in logits.items()]
        room = max((r.params.max_new_tokens for r in reqs if r.params is not None), default=0)
        out = self.runner.prefill(items, decode_room=room)
        events += [_classified(reqs[i].request_id, x, self.step_count) for i, x in out.class_logits.items()]
        if out.batch is None:
            return events
        new = out.batch
        new.rows = [
            _Row(r, r.params, None if r.params.greedy else make_generator(r.params.seed, self.bb.device))
            for r in reqs
            if r.params is not None
        ]
        evs, keep, tokens = self._advance(new.rows, out.logits)
        new = new.filter(keep)
        if new is not None:
            self.batch = DecodeBatch.concatenate(self.batch, new)
            mine = self._tokens if self._tokens is not None else tokens[:0]
            self._tokens = torch.cat([mine, tokens[keep]])
        return events + evs

    # -- per-token bookkeeping ----------------------------------------------------------------------------------
    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> tuple[list[Event], list[int], torch.Tensor]:
        """Samples one token per row from logits (B, V); returns the events, the rows still running, the tokens."""
        tokens = sample(logits, [r.params for r in rows], [r.generator for r in rows])  # (B,)
        want_lp = any(r.params.logprobs for r in rows)
        lps = token_logprobs(logits, tokens).tolist() if want_lp else [None] * len(rows)
        events, keep = [], []
        for i, (row, tok) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            row.output_ids.append(tok)
            ev = Event(
                row.req.request_id,
                token_id=tok,
                logprob=lps[i] if row.params.logprobs else None,
                logits=logits[i].clone() if row.params.return_logits else None,
                step=self.step_count,
            )
            ev.finish_reason = self._finish_reason(row, tok)
            ev.text = self._text_delta(row, ev)
            events.append(ev)
            if ev.finish_reason is None:
                keep.append(i)
        return events, keep, tokens

    def _finish_reason(self, row: _Row, tok: int) -> str | None:
        p = row.params
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_ids):
            return "stop"
        if len(row.output_ids) >= p.max_new_tokens:
            return "length"
        return None

    def _text_delta(self, row: _Row, ev: Event) -> str:
        """Incremental detokenisation with stop strings: decode the whole output, cut at the first stop string,
        and hold back a tail that could still grow into one (or is an incomplete multi-byte character)."""
        tok = self.bb.tokenizer
        if tok is None:
            return ""
        ids = row.output_ids
        if ev.finish_reason == "stop" and ids and (ids[-1] in row.params.stop_token_ids or ids[-1] in self.eos_ids):
            ids = ids[:-1]  # the stop token itself is not part of the text
        text = tok.decode(ids, skip_special_tokens=True)
        stops = row.params.stop
        if stops:
            hits = [text.find(s, max(0, row.emitted - len(s))) for s in stops]
            cuts = [h for h in hits if h >= 0]
            if cuts:
                text, ev.finish_reason = text[: min(cuts)], "stop"
        end = len(text)
        if ev.finish_reason is None:
            if text.endswith("\ufffd"):
                end -= 1
            hold = max((len(s) - 1 for s in stops), default=0)
            end = max(row.emitted, end - hold)
        delta, row.emitted = text[row.emitted : end], max(row.emitted, end)
        return delta

    # -- batch membership ---------------------------------------------------------------------------------------
    def _keep(self, keep: list[int], tokens: torch.Tensor | None) -> None:
        """Restricts the running batch (and the tokens its rows feed next) to rows `keep`."""
        assert self.batch is not None
        self.batch = self.batch.filter(keep)
        self._tokens = tokens[keep] if self.batch is not None and tokens is not None else None

    def _device_prefix(self, req: EngineRequest) -> DevicePrefix | None:
        key = req.key
        if key is None:
            return None
        entry = self.prefixes.get(key)
        if entry is None:
            entry = self.runner.materialize(req.artifact)  # type: ignore[arg-type]
            self.prefixes.put(key, entry)
        return entry
