"""Visual prompts from the VPT reference code's checkpoints (KMnP/vpt), converted to safetensors.

The reference model holds `...prompt_embeddings` (1, P, hidden) for the input layer, `...deep_prompt_embeddings`
(L - 1, P, hidden) for the later layers of VPT-deep, an optional `...prompt_proj` (Linear hidden -> hidden, applied
to every prompt before use; identity when the run had `PROJECT = -1`), and its classifier `...head.last_layer`
(C, hidden) over [CLS] after the final LayerNorm. The projection is folded in here: the artifact stores the prompts
as the layers see them, `(L, P, hidden)` or `(P, hidden)`.

What cannot be checked: that the reference run's ViT weights are the serving backbone's (the fingerprint compares
geometry, not weights). The reference code's checkpoints are torch pickles; they are never loaded here: convert
them with `safetensors.torch.save_file(torch.load(path, weights_only=True)["model"], out)` on a machine you trust.
"""

from __future__ import annotations

from datetime import UTC, datetime

import torch

from .artifact import BackboneFingerprint, ClassificationHead, PrefixArtifact
from .errors import ArtifactShapeError, BackboneMismatch, UnsupportedAdapter


def _one(tensors: dict[str, torch.Tensor], suffix: str, exclude: str | None = None) -> torch.Tensor | None:
    keys = [k for k in tensors if k.endswith(suffix) and not (exclude and k.endswith(exclude))]
    if len(keys) > 1:
        raise UnsupportedAdapter(f"expected one tensor named *{suffix}, got {keys[:4]}")
    return tensors[keys[0]] if keys else None


def import_vpt_checkpoint(
    tensors: dict[str, torch.Tensor], *, task: str, backbone: BackboneFingerprint, labels: list[str] | None = None
) -> PrefixArtifact:
    shallow = _one(tensors, "prompt_embeddings", exclude="deep_prompt_embeddings")
    deep = _one(tensors, "deep_prompt_embeddings")
    if shallow is None:
        raise UnsupportedAdapter(f"a VPT checkpoint has a *prompt_embeddings tensor; got {sorted(tensors)[:8]}")
    L, H = backbone.num_layers, backbone.hidden_size
    if shallow.ndim != 3 or shallow.shape[0] != 1 or shallow.shape[2] != H:
        raise ArtifactShapeError(f"prompt_embeddings: expected (1, P, hidden={H}), got {tuple(shallow.shape)}")
    P = shallow.shape[1]
    if deep is not None and tuple(deep.shape) != (L - 1, P, H):
        raise BackboneMismatch(
            f"deep_prompt_embeddings: expected (L - 1, P, hidden) = {(L - 1, P, H)}, got {tuple(deep.shape)}"
        )
    weight, bias = _one(tensors, "prompt_proj.weight"), _one(tensors, "prompt_proj.bias")
    if weight is not None and tuple(weight.shape) != (H, H):
        raise ArtifactShapeError(f"prompt_proj.weight: expected (hidden, hidden) = {(H, H)}, got {tuple(weight.shape)}")

    def project(x: torch.Tensor) -> torch.Tensor:  # x (..., hidden), as the reference applies prompt_proj
        x = x.float()
        if weight is not None:
            x = x @ weight.float().T + (bias.float() if bias is not None else 0)
        return x

    prompts = project(shallow[0])  # (P, hidden)
    deep_prompt = torch.cat([prompts[None], project(deep)]) if deep is not None else None  # (L, P, hidden)
    head = None
    w = _one(tensors, "head.last_layer.weight")
    if w is not None:
        b = _one(tensors, "head.last_layer.bias")
        names = labels or [f"LABEL_{i}" for i in range(w.shape[0])]
        if w.ndim != 2 or w.shape[1] != H or len(names) != w.shape[0]:
            raise ArtifactShapeError(
                f"head.last_layer.weight: expected (C={len(names)}, hidden={H}), got {tuple(w.shape)}"
            )
        head = ClassificationHead(w.float(), None if b is None else b.float(), list(names), "cls")
    return PrefixArtifact(
        task=task,
        method="vpt_deep" if deep_prompt is not None else "vpt_shallow",
        fingerprint=backbone,
        soft_prompt=None if deep_prompt is not None else prompts,
        deep_prompt=deep_prompt,
        head=head,
        training={"source": "VPT reference checkpoint", "prompt_proj": weight is not None},
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
