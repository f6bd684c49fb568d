"""Builders of valid test objects, with random (never zero-ish) tensors so layout bugs cannot hide."""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load
from safetensors.torch import save as st_save

from prefix_store import BackboneFingerprint, ClassificationHead, PrefixArtifact
from prefix_store.codec import checksum

TINY_LLAMA = BackboneFingerprint(
    model_type="llama", num_layers=3, hidden_size=64, num_attention_heads=8, num_kv_heads=2, head_dim=8, vocab_size=100
)


def make_artifact(
    task: str = "demo",
    method: str = "prefix_tuning",
    *,
    P: int = 5,
    dtype: torch.dtype = torch.float32,
    fp: BackboneFingerprint = TINY_LLAMA,
    labels: list[str] | None = None,
    fill: float | None = None,
    seed: int = 0,
    training: dict | None = None,
) -> PrefixArtifact:
    """`fill` makes every prefix value equal to it, so a reader can check a tensor belongs to its version."""
    g = torch.Generator().manual_seed(seed)
    if method in ("prefix_tuning", "p_tuning_v2"):
        shape = (fp.num_layers, 2, fp.num_kv_heads, P, fp.head_dim)
    else:
        shape = (P, fp.hidden_size)
    t = torch.full(shape, fill) if fill is not None else torch.randn(shape, generator=g)
    head = None
    if labels is not None:
        head = ClassificationHead(
            weight=torch.randn(len(labels), fp.hidden_size, generator=g).to(dtype),
            bias=torch.randn(len(labels), generator=g).to(dtype),
            labels=labels,
            pooling="pooler",
        )
    kv_method = method in ("prefix_tuning", "p_tuning_v2")
    return PrefixArtifact(
        task=task,
        method=method,
        fingerprint=fp,
        kv=t.to(dtype) if kv_method else None,
        soft_prompt=None if kv_method else t.to(dtype),
        head=head,
        training={"dataset": "unit-test", "metrics": {"accuracy": 0.5}} if training is None else training,
    )


def rewrite_blob(blob: bytes, *, meta_edit=None, tensor_edit=None, fix_checksum=False) -> bytes:
    """Re-encodes a blob after editing its metadata and/or tensors, bypassing the artifact's own validation."""
    (n,) = struct.unpack("<Q", blob[:8])
    meta = json.loads(json.loads(blob[8 : 8 + n])["__metadata__"]["prefix_serve"])
    tensors = load(blob)
    if tensor_edit:
        tensor_edit(tensors)
    if meta_edit:
        meta_edit(meta)
    if fix_checksum:
        meta["checksum"] = checksum(tensors)
    return st_save(tensors, metadata={"prefix_serve": json.dumps(meta)})
