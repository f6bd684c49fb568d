"""Runs the frozen backbone on mixed-prefix batches: prefill, decode, classification, soft-prompt materialisation.

Everything here executes on the engine's one worker thread and works on tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from prefix_store import ClassificationHead, PrefixArtifact, VersionKey

from .backbone import Backbone
from .batch import KVState, cache_from
from .prefix_kv import prefix_zone, right_pad, token_positions


@dataclass
class DevicePrefix:
    """A task version ready to run: tensors on the backbone's device, in its dtype.

    kv: (L, 2, H_kv, P, D) for key/value methods, and for soft prompts on causal LMs (computed once at load: under
        causal attention the soft prompt's keys/values do not depend on what follows it).
    soft_prompt: (P, hidden) for soft prompts on encoders, where attention is bidirectional; fed as embeddings.
    """

    task: str
    version: int
    method: str
    kv: torch.Tensor | None
    soft_prompt: torch.Tensor | None
    head: ClassificationHead | None  # its tensors on the device

    @property
    def key(self) -> VersionKey:
        return (self.task, self.version)

    @property
    def num_virtual_tokens(self) -> int:
        t = self.kv if self.kv is not None else self.soft_prompt
        return 0 if t is None else (t.shape[3] if t.ndim == 5 else t.shape[0])

    @property
    def nbytes(self) -> int:
        ts = [self.kv, self.soft_prompt] + ([self.head.weight, self.head.bias] if self.head else [])
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


@dataclass
class PrefillItem:
    prefix: DevicePrefix | None  # None: the bare backbone
    input_ids: list[int]
    token_type_ids: list[int] | None = None  # encoders, sentence pairs
    generate: bool = True  # False: a classification row, dropped after the forward


@dataclass
class PrefillOutput:
    logits: torch.Tensor | None  # (B_gen, V) fp32: next-token logits of the generation items, in item order
    class_logits: dict[int, torch.Tensor]  # item index -> (C,) fp32 head logits, for classification items
    kv: KVState | None  # the generation items' key/value state, in item order; None without generation items


class ModelRunner:
    def __init__(self, backbone: Backbone) -> None:
        self.bb = backbone
        self.fp = backbone.fingerprint
        self.body = backbone.body
        self.lm_head = backbone.lm_head
        self.embed = backbone.embeddings
        tok = backbone.tokenizer
        self.pad_id = (tok.pad_token_id if tok is not None else None) or 0

    # -- loading ----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def materialize(self, artifact: PrefixArtifact) -> DevicePrefix:
        """Checks an artifact against the backbone and turns it into a DevicePrefix."""
        self.bb.check(artifact)
        art = artifact.to(self.bb.dtype)
        dev = self.bb.device
        kv = art.kv.to(dev) if art.kv is not None else None
        soft = art.soft_prompt.to(dev) if art.soft_prompt is not None else None
        if soft is not None and not self.bb.is_encoder:
            kv, soft = self._soft_prompt_kv(soft), None
        head = None
        if art.head is not None:
            bias = art.head.bias.to(dev) if art.head.bias is not None else None
            head = ClassificationHead(art.head.weight.to(dev), bias, list(art.head.labels), art.head.pooling)
        assert art.version is not None, "only stored versions are served"
        return DevicePrefix(art.task, art.version, art.method, kv, soft, head)

    def _soft_prompt_kv(self, soft: torch.Tensor) -> torch.Tensor:
        """Keys/values of a soft prompt at positions 0..P-1: (P, hidden) -> (L, 2, H_kv, P, D)."""
        P = soft.shape[0]
        cache = DynamicCache()
        pos = torch.arange(P, device=soft.device)[None]  # (1, P)
        self.body(inputs_embeds=soft[None], position_ids=pos, use_cache=True, **self.bb.with_cache(cache))
        layers = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]  # each (2, H_kv, P, D)
        return torch.stack(layers)

    # -- causal LM --------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, items: list[PrefillItem], decode_room: int = 64) -> PrefillOutput:
        """One forward over new rows of any mix of tasks; returns next-token logits, label probabilities, and the
        generation rows' cache, ready to join the running batch."""
        kvs = [it.prefix.kv if it.prefix is not None else None for it in items]
        zone, pmask = self._zone(kvs)  # (L, 2, B, H_kv, Pmax, D), (B, Pmax)
        lengths = [len(it.input_ids) for it in items]
        prefix_lens = [0 if kv is None else kv.shape[3] for kv in kvs]
        ids, tmask = right_pad([it.input_ids for it in items], self.pad_id, self.bb.device)  # (B, Tmax)
        pos = token_positions(prefix_lens, lengths, ids.shape[1], self.bb.device)  # (B, Tmax)
        mask = torch.cat([pmask, tmask], dim=1)  # (B, Pmax + Tmax)
        # Room for the prompt and the expected new tokens, so neither prefill nor decode reallocates.
        cache = cache_from(list(zone[:, 0]), list(zone[:, 1]), spare=ids.shape[1] + decode_room)
        out = self.body(
            input_ids=ids, attention_mask=mask.long(), position_ids=pos, use_cache=True, **self.bb.with_cache(cache)
        )
        h = out.last_hidden_state  # (B, Tmax, hidden)
        rows = torch.arange(len(items), device=h.device)
        last = h[rows, torch.tensor(lengths, device=h.device) - 1]  # (B, hidden): each row's last real token
        gen = [i for i, it in enumerate(items) if it.generate]
        logits = self.lm_head(last[gen]).float() if gen else None  # (B_gen, V)
        cls = {
            i: self._head_logits(it.prefix, h[i, : lengths[i]], last[i])
            for i, it in enumerate(items)
            if not it.generate
        }
        next_pos = torch.tensor([p + n for p, n in zip(prefix_lens, lengths, strict=True)], device=h.device)
        kv = None
        if gen:
            idx = torch.tensor(gen, device=h.device)
            keep = gen == list(range(len(items)))
            layers = cache.layers
            gen_cache = (
                cache if keep else cache_from([la.keys[idx] for la in layers], [la.values[idx] for la in layers])
            )
            kv = KVState(gen_cache, mask[idx], next_pos[idx])
        return PrefillOutput(logits, cls, kv)

    @torch.inference_mode()
    def decode(self, kv: KVState, tokens: torch.Tensor) -> torch.Tensor:
        """Feeds one token per row (B,), appends its key column to `kv` (cache, mask, positions), returns next-token
        logits (B, V) fp32."""
        mask = torch.cat([kv.mask, kv.mask.new_ones(kv.mask.shape[0], 1)], dim=1)  # (B, S + 1)
        out = self.body(
            input_ids=tokens[:, None],
            attention_mask=mask.long(),
            position_ids=kv.next_pos[:, None],
            use_cache=True,
            **self.bb.with_cache(kv.cache),
        )
        kv.mask, kv.next_pos = mask, kv.next_pos + 1
        return self.lm_head(out.last_hidden_state[:, -1]).float()

    # -- encoder ----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def classify_encoder(self, items: list[PrefillItem]) -> dict[int, torch.Tensor]:
        """Head logits (C,) per item for a BERT-family backbone. Key/value prefixes enter as the cache; soft
        prompts as input embeddings in front of the tokens (positions from 0, as PEFT feeds them)."""
        dev = self.bb.device
        kv = [it.prefix.kv if it.prefix is not None else None for it in items]
        soft = [it.prefix.soft_prompt if it.prefix is not None else None for it in items]
        zone, pmask = self._zone(kv)
        n_soft = [0 if s is None else s.shape[0] for s in soft]
        lengths = [ns + len(it.input_ids) for ns, it in zip(n_soft, items, strict=True)]
        starts = [0 if k is None else k.shape[3] for k in kv]  # soft rows start at 0: the soft tokens are inputs
        ids, tmask = right_pad(
            [[self.pad_id] * ns + it.input_ids for ns, it in zip(n_soft, items, strict=True)], self.pad_id, dev
        )
        types, _ = right_pad(
            [[0] * ns + (it.token_type_ids or [0] * len(it.input_ids)) for ns, it in zip(n_soft, items, strict=True)],
            0,
            dev,
        )
        inputs: dict[str, torch.Tensor] = {"input_ids": ids}
        if any(n_soft):
            embeds = self.embed(ids)  # (B, Tmax, hidden)
            for i, s in enumerate(soft):
                if s is not None:
                    embeds[i, : s.shape[0]] = s
            inputs = {"inputs_embeds": embeds}
        out = self.body(
            **inputs,
            token_type_ids=types,
            attention_mask=torch.cat([pmask, tmask], 1).long(),
            position_ids=token_positions(starts, lengths, ids.shape[1], dev),
            **self.bb.with_cache(cache_from(list(zone[:, 0]), list(zone[:, 1]), spare=ids.shape[1])),
        )
        h = out.last_hidden_state  # (B, Tmax, hidden)
        pooled = out.pooler_output  # (B, hidden) or None
        return {
            i: self._head_logits(
                it.prefix, h[i, n_soft[i] : lengths[i]], h[i, 0], pooled[i] if pooled is not None else None
            )
            for i, it in enumerate(items)
        }

    # -- shared -----------------------------------------------------------------------------------------------------
    def _zone(self, kvs: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        fp = self.fp
        return prefix_zone(
            kvs,
            num_layers=fp.num_layers,
            num_kv_heads=fp.num_kv_heads,
            head_dim=fp.head_dim,
            dtype=self.bb.dtype,
            device=self.bb.device,
        )

    @staticmethod
    def _head_logits(
        prefix: DevicePrefix | None,
        tokens: torch.Tensor,
        first_or_last: torch.Tensor,
        pooler: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pools one row's hidden states as its head asks and returns the head's logits (C,) in fp32.

        tokens: (n, hidden) the row's input tokens; first_or_last: the [CLS] state (encoders) or the last real
        token's state (causal LMs); pooler: the encoder's pooler output for the row.
        """
        assert prefix is not None and prefix.head is not None, "classification rows are checked for a head"
        head = prefix.head
        if head.pooling == "pooler":
            x = pooler
        elif head.pooling == "mean":
            x = tokens.mean(0)
        else:  # "cls" on encoders, "last_token" on causal LMs
            x = first_or_last
        logits = x @ head.weight.T + (head.bias if head.bias is not None else 0)  # (C,)
        return logits.float()
