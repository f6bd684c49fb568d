"""Channel scaling ((IA)^3, Liu et al. 2022): per adapted projection a vector multiplying its output (out,) or, for
a feed-forward one, its input (in,), applied per row through the ScaleTable (runtime/scaling.py)."""

from __future__ import annotations

from prefix_store import BackboneMismatch, PrefixArtifact

from ..backbone import Backbone
from .parts import DeviceParts, on_device, unadaptable


def check(bb: Backbone, artifact: PrefixArtifact) -> None:
    """Every module is a projection of the body, each vector the size of the side it scales."""
    sizes = bb.linear_sizes
    for path, s in (artifact.scales or {}).items():
        if path not in sizes:
            raise unadaptable(bb, path, "IA3")
        n_in, n_out = sizes[path]
        side, want = ("input", n_in) if s.on_input else ("output", n_out)
        if s.vector.numel() != want:
            raise BackboneMismatch(f"IA3 {path}: expected a vector of its {side} size {want}, got {s.vector.numel()}")


def load(bb: Backbone, artifact: PrefixArtifact) -> DeviceParts:
    assert artifact.scales is not None, "a scaling method carries scales (checked at construction)"
    return DeviceParts(scales={path: (on_device(bb, s.vector), s.on_input) for path, s in artifact.scales.items()})
