"""Key/value prefixes (Prefix-Tuning, P-Tuning v2): per-layer key/values (L, 2, H_kv, P, D) every token of the row
attends to. Served as they are stored: into the PrefixPool, read by the registered attention (attention.py)."""

from __future__ import annotations

from prefix_store import PrefixArtifact

from ..backbone import Backbone
from .parts import DeviceParts, on_device


def check(bb: Backbone, artifact: PrefixArtifact) -> None:
    """Nothing beyond the common checks: the fingerprint fixes L, H_kv and D."""


def load(bb: Backbone, artifact: PrefixArtifact) -> DeviceParts:
    assert artifact.kv is not None, "the artifact's method carries kv (checked at construction)"
    return DeviceParts(kv=on_device(bb, artifact.kv))
