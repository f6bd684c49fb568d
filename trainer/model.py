"""The training forward: frozen backbone + a method's prefix module + an optional head, laid out exactly as the
server lays out a row (service/runtime/prefix_kv.py): key/value prefixes in the cache with token positions P + j, soft
prompts as the first P input embeddings with positions from 0, right padding. So what is trained is what is served.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache

from prefix_store import KV_METHODS, BackboneFingerprint, ClassificationHead, PrefixArtifact
from service.runtime import Backbone
from service.runtime.backbone import vit_layers
from service.runtime.bias import MLM_BIAS, bias_modules
from service.runtime.prefix_kv import right_pad, token_positions

from .methods import BiasDeltas


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) right-padded token ids
    mask: torch.Tensor  # (B, T) bool, real tokens
    lengths: list[int]
    labels: torch.Tensor | None = None  # generation: (B, T) next-token targets aligned to ids (-100: ignore)
    classes: torch.Tensor | None = None  # classification: (B,) class indices
    types: torch.Tensor | None = None  # (B, T) token type ids (encoders)
    pixels: torch.Tensor | None = None  # (B, C, H, W) images (image backbones; ids are then a placeholder)


def make_batch(
    rows: list[list[int]],
    device: torch.device,
    pad_id: int,
    *,
    labels: list[list[int]] | None = None,
    classes: list[int] | None = None,
    types: list[list[int]] | None = None,
) -> Batch:
    ids, mask = right_pad(rows, pad_id, device)
    lab = right_pad(labels, -100, device)[0] if labels is not None else None
    typ = right_pad(types, 0, device)[0] if types is not None else None
    cls = torch.tensor(classes, device=device) if classes is not None else None
    return Batch(ids, mask, [len(r) for r in rows], lab, cls, typ)


class TaskModel(nn.Module):
    """Args:
    backbone: the frozen backbone (shared with evaluation through the serving engine).
    method: one of the four methods; prefix: its module (trainer.methods).
    num_labels: adds a linear head (encoders: with bias; causal LMs: without, like transformers' score heads).
    pooling: what the head reads, as the server will read it (service/runtime/runner.py head_logits): "pooler",
        "cls" (column 0), "mean" (the real input tokens), "last_token".
    verbalizer: instead of a linear head, one vocabulary token per label, scored by the masked-LM head at the first
        [MASK] of each row (as runner.verbalize serves it).
    """

    def __init__(
        self,
        backbone: Backbone,
        method: str,
        prefix: nn.Module,
        num_labels: int | None = None,
        head_dropout: float = 0.1,
        pooling: str | None = None,
        verbalizer: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.bb, self.method, self.prefix = backbone, method, prefix
        self.verbalizer = verbalizer
        if verbalizer is not None:
            num_labels = None  # the masked-LM head scores the labels: no linear head
        self._bias_modules = bias_modules(backbone) if isinstance(prefix, BiasDeltas) else {}
        self.pooling = "mask" if verbalizer is not None else (pooling or backbone.pooling)
        self.body = backbone.body
        self.lm_head = backbone.lm_head
        self.fp: BackboneFingerprint = backbone.fingerprint
        self.head = nn.Linear(self.fp.hidden_size, num_labels, bias=backbone.is_encoder) if num_labels else None
        self.dropout = nn.Dropout(head_dropout)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=0.02)
            if self.head.bias is not None:
                nn.init.zeros_(self.head.bias)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]  # the backbone is frozen

    def hidden(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Runs the backbone with the prefix. Returns (hidden of the tokens (B, T, hidden), pooler output or None,
        offset of the first token column in the body's output)."""
        if batch.pixels is not None:
            return self._image_hidden(batch)
        x = self.prefix()
        B, T = batch.ids.shape
        dev = batch.ids.device
        if isinstance(self.prefix, BiasDeltas):  # the deltas enter through hooks (see loss): a plain forward
            kwargs = {"token_type_ids": batch.types} if self.bb.is_encoder else {}
            out = self.body(
                input_ids=batch.ids,
                attention_mask=batch.mask.long(),
                position_ids=token_positions([self.bb.position_offset] * B, batch.lengths, T, dev),
                **kwargs,
            )
            return out.last_hidden_state, getattr(out, "pooler_output", None), 0
        if self.method in KV_METHODS:  # x: (L, 2, H_kv, P, D)
            P = x.shape[3]
            cache = DynamicCache()
            for layer in range(x.shape[0]):
                k = x[layer, 0].to(self.bb.dtype)[None].expand(B, -1, -1, -1)  # (B, H_kv, P, D)
                v = x[layer, 1].to(self.bb.dtype)[None].expand(B, -1, -1, -1)
                cache.update(k, v, layer)
            mask = torch.cat([batch.mask.new_ones(B, P), batch.mask], 1)
            kwargs = {"token_type_ids": batch.types} if self.bb.is_encoder else {}
            out = self.body(
                input_ids=batch.ids,
                attention_mask=mask.long(),
                use_cache=True,
                **self.bb.with_cache(cache),
                position_ids=token_positions([self.bb.position_offset + P] * B, batch.lengths, T, dev),
                **kwargs,
            )
            return out.last_hidden_state, getattr(out, "pooler_output", None), 0
        P = x.shape[0]  # soft prompt (P, hidden): the first P input embeddings, positions from 0
        embeds = torch.cat([x.to(self.bb.dtype)[None].expand(B, -1, -1), self.bb.embeddings(batch.ids)], 1)
        mask = torch.cat([batch.mask.new_ones(B, P), batch.mask], 1)
        pos = token_positions([self.bb.position_offset] * B, [P + n for n in batch.lengths], P + T, dev)
        kwargs = {}
        if self.bb.is_encoder:
            types = batch.types if batch.types is not None else torch.zeros_like(batch.ids)
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(B, P), types], 1)
        out = self.body(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=pos, **kwargs)
        return out.last_hidden_state, getattr(out, "pooler_output", None), P

    def _image_hidden(self, batch: Batch) -> tuple[torch.Tensor, None, int]:
        """A ViT with visual prompts, as Jia et al. run it: shallow prompts inserted after [CLS] once the position
        embeddings are in; deep prompts inserted at every layer's input and their outputs dropped. (B, T, hidden)
        after the final LayerNorm; the server gets the same from the prompts' keys/values (runner.classify_images)."""
        assert batch.pixels is not None
        p = self.prefix().to(self.bb.dtype)
        x = self.body.embeddings(batch.pixels.to(self.bb.dtype))  # (B, 1 + N, hidden)
        B = x.shape[0]
        if self.method == "vpt_shallow":
            x = torch.cat([x[:, :1], p[None].expand(B, -1, -1), x[:, 1:]], 1)
        for i, layer in enumerate(vit_layers(self.body)):
            if self.method == "vpt_deep":
                P = p.shape[1]
                x = layer(torch.cat([x[:, :1], p[i][None].expand(B, -1, -1), x[:, 1:]], 1), None)
                x = torch.cat([x[:, :1], x[:, 1 + P :]], 1)
            else:
                x = layer(x, None)
        return self.body.layernorm(x), None, 0

    def applied(self) -> contextlib.AbstractContextManager[None]:
        """The bias deltas in effect (bitfit), for the forward inside."""
        if isinstance(self.prefix, BiasDeltas):
            return self.prefix.applied(self._bias_modules)
        return contextlib.nullcontext()

    def loss(self, batch: Batch) -> torch.Tensor:
        with self.applied():
            return self._loss(batch)

    def _loss(self, batch: Batch) -> torch.Tensor:
        h, pooled, off = self.hidden(batch)
        if batch.classes is not None:
            return F.cross_entropy(self.class_logits(h, pooled, off, batch), batch.classes)
        assert self.lm_head is not None and batch.labels is not None
        # Token t predicts labels[t + 1]; only target positions are projected onto the vocabulary.
        targets = batch.labels[:, 1:]  # (B, T-1)
        keep = targets != -100
        logits = self.bb.logits(h[:, off : off + batch.ids.shape[1] - 1][keep])  # (N, V), as the server scores
        return F.cross_entropy(logits.float(), targets[keep])

    def class_logits(self, h: torch.Tensor, pooled: torch.Tensor | None, off: int, batch: Batch) -> torch.Tensor:
        if self.verbalizer is not None:
            return self.verbalize(h, off, batch)
        assert self.head is not None
        return self.head(self.dropout(self.pool(h, pooled, off, batch))).float()

    def verbalize(self, h: torch.Tensor, off: int, batch: Batch) -> torch.Tensor:
        """(B, C) label logits: the masked-LM head at each row's first [MASK], at the verbalizer's tokens only."""
        mlm, mask_id = self.bb.mlm, self.bb.mask_token_id
        assert mlm is not None and mask_id is not None and self.verbalizer is not None
        at = (batch.ids == mask_id).int().argmax(1) + off  # (B,) every row has one: the trainer checks
        z = h[torch.arange(h.shape[0], device=h.device), at]  # (B, hidden)
        if mlm.transform is not None:
            z = mlm.transform(z)
        verb = torch.tensor(self.verbalizer, device=h.device)  # (C,)
        logits = z @ mlm.weight[verb].T  # (B, C)
        if mlm.bias is not None:
            logits = logits + mlm.bias[verb]
        if isinstance(self.prefix, BiasDeltas):
            delta = self.prefix().get(MLM_BIAS)
            if delta is not None:
                logits = logits + delta[verb].to(logits.dtype)
        return logits.float()

    def pool(self, h: torch.Tensor, pooled: torch.Tensor | None, off: int, batch: Batch) -> torch.Tensor:
        """(B, hidden) states the head reads. h (B, off + T, hidden): `off` soft-prompt columns, then the tokens."""
        if self.pooling == "pooler":
            assert pooled is not None, "the backbone has no pooler"
            return pooled
        if self.pooling == "cls":
            return h[:, 0]  # column 0, as the server reads it (the first soft-prompt token for soft prompts, as PEFT)
        if self.pooling == "mean":
            m = batch.mask[..., None].to(h.dtype)  # (B, T, 1)
            return (h[:, off : off + batch.ids.shape[1]] * m).sum(1) / m.sum(1)
        last = torch.tensor(batch.lengths, device=h.device) - 1 + off
        return h[torch.arange(h.shape[0], device=h.device), last]  # last real token

    @torch.no_grad()
    def artifact(
        self, task: str, labels: list[str] | None, training: dict, template: str | None = None
    ) -> PrefixArtifact:
        head = None
        if self.verbalizer is not None:
            head = ClassificationHead(None, None, list(labels or []), "mask", token_ids=list(self.verbalizer))
        elif self.head is not None:
            bias = self.head.bias.detach().float().cpu() if self.head.bias is not None else None
            head = ClassificationHead(self.head.weight.detach().float().cpu(), bias, list(labels or []), self.pooling)
        # The trained tensors, copied (the parameters keep training), under the artifact field of the method.
        tensors: dict[str, Any]
        if isinstance(self.prefix, BiasDeltas):
            tensors = {"biases": {k: v.detach().float().cpu().clone() for k, v in self.prefix().items()}}
        else:
            field = "kv" if self.method in KV_METHODS else "deep_prompt" if self.method == "vpt_deep" else "soft_prompt"
            tensors = {field: self.prefix().detach().float().cpu().clone()}
        return PrefixArtifact(
            task=task,
            method=self.method,
            fingerprint=self.fp,
            head=head,
            template=template,
            training=training,
            **tensors,
        )
