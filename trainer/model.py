"""The training forward: frozen backbone + a method's adapter module + an optional head. The adapter lays a row
out exactly as the server does (its family module in trainer/methods), and the head reads it with the server's own
pooling and verbalizer scoring (service/runtime/heads.py). So what is trained is what is served.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from prefix_store import BackboneFingerprint, ClassificationHead, PrefixArtifact
from service.runtime import Backbone
from service.runtime.heads import mlm_states, pool, verbalizer_logits

from .batch import Batch
from .methods import Adapter


class TaskModel(nn.Module):
    """Args:
    backbone: the frozen backbone (shared with evaluation through the serving engine).
    method: a registered method (prefix_store/methods.py); prefix: its trainable module (trainer.methods).
    num_labels: adds a linear head (encoders: with bias; causal LMs: without, like transformers' score heads).
    pooling: what the head reads, as the server reads it (service/runtime/heads.py): "pooler", "cls" (column 0),
        "mean" (the real input tokens), "last_token".
    verbalizer: instead of a linear head, one vocabulary token per label, scored by the masked-LM head at the first
        [MASK] of each row (heads.verbalizer_logits, as the server scores it).
    """

    def __init__(
        self,
        backbone: Backbone,
        method: str,
        prefix: Adapter,
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
        """Runs the backbone with the adapter, as its family lays a row out. Returns (hidden of the tokens
        (B, off + T, hidden), pooler output or None, offset of the first token column in the body's output)."""
        return self.prefix.hidden(self.bb, batch)

    def applied(self) -> contextlib.AbstractContextManager[None]:
        """What the adapter needs in effect around the forward (a bias task's deltas)."""
        return self.prefix.applied(self.bb)

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
        z = mlm_states(mlm, h[torch.arange(h.shape[0], device=h.device), at])  # (B, hidden)
        verb = torch.tensor(self.verbalizer, device=h.device)  # (C,)
        return verbalizer_logits(mlm, z, verb, self.prefix.label_delta(verb))

    def pool(self, h: torch.Tensor, pooled: torch.Tensor | None, off: int, batch: Batch) -> torch.Tensor:
        """(B, hidden) states the head reads. h (B, off + T, hidden): `off` soft-prompt columns, then the tokens.
        "cls" reads column 0 (the first soft-prompt token for soft prompts, as PEFT and the server do)."""
        m = batch.mask[..., None].to(h.dtype)  # (B, T, 1)
        mean = (h[:, off : off + batch.ids.shape[1]] * m).sum(1) / m.sum(1)  # (B, hidden)
        rows = torch.arange(h.shape[0], device=h.device)
        last = h[rows, torch.tensor(batch.lengths, device=h.device) - 1 + off]  # the last real token
        return pool(self.pooling, mean, h[:, 0] if self.pooling == "cls" else last, pooled)

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
        tensors: dict[str, Any] = self.prefix.artifact_tensors(self.method)
        return PrefixArtifact(
            task=task,
            method=self.method,
            fingerprint=self.fp,
            head=head,
            template=template,
            training=training,
            **tensors,
        )
