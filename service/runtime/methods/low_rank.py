"""Low-rank updates (LoRA, Hu et al. 2021): per adapted projection the factors A (r, in) and B (out, r), the
projection's output gaining `x A^T B^T * scale`, applied per row through the LowRankTable (runtime/low_rank.py)."""

from __future__ import annotations

from prefix_store import BackboneMismatch, PrefixArtifact, UnsupportedAdapter

from ..backbone import Backbone
from .parts import DeviceParts, on_device, unadaptable


def check(bb: Backbone, artifact: PrefixArtifact) -> None:
    """Every module is a projection of the body with the factors' sizes, of a rank within the server's limit."""
    sizes = bb.linear_sizes
    for path, f in (artifact.low_rank or {}).items():
        if path not in sizes:
            raise unadaptable(bb, path, "LoRA")
        n_in, n_out = sizes[path]
        if f.rank > bb.max_lora_rank:
            raise UnsupportedAdapter(
                f"LoRA rank {f.rank} of {path} is over this server's limit of {bb.max_lora_rank} "
                "(PREFIXSERVE_MAX_LORA_RANK)"
            )
        if tuple(f.a.shape) != (f.rank, n_in) or tuple(f.b.shape) != (n_out, f.rank):
            raise BackboneMismatch(
                f"LoRA {path}: expected A (r, in) = ({f.rank}, {n_in}) and B (out, r) = ({n_out}, {f.rank}), got "
                f"A {tuple(f.a.shape)}, B {tuple(f.b.shape)}"
            )


def load(bb: Backbone, artifact: PrefixArtifact) -> DeviceParts:
    assert artifact.low_rank is not None, "a low-rank method carries low_rank (checked at construction)"
    return DeviceParts(
        low_rank={  # the scale folded into B: one matmul less per module and row, and per-module scales for free
            path: (on_device(bb, f.a), on_device(bb, f.b.float() * f.scale)) for path, f in artifact.low_rank.items()
        }
    )
