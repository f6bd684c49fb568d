"""Visual prompts (VPT, Jia et al. 2022) of a ViT.

VPT-shallow: prompt tokens (P, hidden) inserted after [CLS] once the position embeddings are in, fed as embeddings
with every image. VPT-deep: layer i's prompt tokens p_i (L, P, hidden) are inserted at that layer's input and their
outputs dropped, so they only ever act as keys/values of the image tokens: each layer's prefix is
`k_proj(LN1(p_i))`, `v_proj(LN1(p_i))`, computed once at load and served from the PrefixPool."""

from __future__ import annotations

import torch

from prefix_store import PrefixArtifact

from ..backbone import Backbone, vit_layers
from .parts import DeviceParts, on_device


def check(bb: Backbone, artifact: PrefixArtifact) -> None:
    """Nothing beyond the common checks (the registry keeps visual prompts on image backbones)."""


def load(bb: Backbone, artifact: PrefixArtifact) -> DeviceParts:
    if artifact.deep_prompt is not None:
        return DeviceParts(kv=deep_prompt_kv(bb, on_device(bb, artifact.deep_prompt)))
    assert artifact.soft_prompt is not None, "vpt_shallow carries soft_prompt (checked at construction)"
    return DeviceParts(embeds=on_device(bb, artifact.soft_prompt))


def deep_prompt_kv(bb: Backbone, prompts: torch.Tensor) -> torch.Tensor:
    """Per-layer prompts (L, P, hidden) -> their key/values (L, 2, H, P, D). ViT is pre-LN: the LayerNorm belongs
    in it."""
    fp = bb.fingerprint
    P = prompts.shape[1]
    out = []
    for i, layer in enumerate(vit_layers(bb.body)):
        x = layer.layernorm_before(prompts[i])  # (P, hidden)
        att = layer.attention
        k = att.k_proj(x).view(P, fp.num_kv_heads, fp.head_dim).transpose(0, 1)  # (H, P, D)
        v = att.v_proj(x).view(P, fp.num_kv_heads, fp.head_dim).transpose(0, 1)
        out.append(torch.stack([k, v]))  # (2, H, P, D)
    return torch.stack(out)
