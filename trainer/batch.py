"""A training batch, laid out as the server lays out rows: right-padded token ids (service/runtime/prefix_kv.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.runtime.prefix_kv import right_pad


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
