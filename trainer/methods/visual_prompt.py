"""Visual prompts (VPT, Jia et al. 2022) of a ViT, trained as the paper runs them: shallow prompts inserted after
[CLS] once the position embeddings are in; deep prompts inserted at every layer's input and their outputs dropped.
The server gets the same from the prompts' keys/values (service/runtime/methods/visual_prompt.py)."""

from __future__ import annotations

import math

import torch
from torch import nn

from prefix_store import REGISTRY
from prefix_store.jobs import TrainSpec
from service.runtime import Backbone
from service.runtime.backbone import vit_layers

from ..batch import Batch
from .base import Adapter, BuildContext, Hidden


class VisualPrompt(Adapter):
    """Prompt tokens, (P, hidden) for VPT-shallow or (L, P, hidden) for VPT-deep, initialised as the reference code
    does: uniform in +-sqrt(6 / (3 * patch^2 + hidden))."""

    def __init__(self, shape: tuple[int, ...], patch_size: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        bound = math.sqrt(6.0 / (3 * patch_size * patch_size + shape[-1]))
        self.prompt = nn.Parameter((torch.rand(shape, generator=generator) * 2 - 1) * bound)

    def forward(self) -> torch.Tensor:
        return self.prompt

    @property
    def deep(self) -> bool:
        return self.prompt.ndim == 3

    def hidden(self, bb: Backbone, batch: Batch) -> Hidden:
        """(B, T, hidden) after the final LayerNorm."""
        assert batch.pixels is not None, "visual prompts train on images"
        p = self().to(bb.dtype)  # (P, hidden) or (L, P, hidden)
        x = bb.body.embeddings(batch.pixels.to(bb.dtype))  # (B, 1 + N, hidden)
        B = x.shape[0]
        if not self.deep:
            x = torch.cat([x[:, :1], p[None].expand(B, -1, -1), x[:, 1:]], 1)
        for i, layer in enumerate(vit_layers(bb.body)):
            if self.deep:
                P = p.shape[1]
                x = layer(torch.cat([x[:, :1], p[i][None].expand(B, -1, -1), x[:, 1:]], 1), None)
                x = torch.cat([x[:, :1], x[:, 1 + P :]], 1)
            else:
                x = layer(x, None)
        return bb.body.layernorm(x), None, 0


def build(spec: TrainSpec, ctx: BuildContext) -> VisualPrompt:
    fp, P = ctx.backbone.fingerprint, spec.num_virtual_tokens or 0
    deep = REGISTRY[spec.method].fields == ("deep_prompt",)
    shape = (fp.num_layers, P, fp.hidden_size) if deep else (P, fp.hidden_size)
    patch_size = getattr(ctx.backbone.model.config, "patch_size", 16)
    return VisualPrompt(shape, patch_size, ctx.generator)
