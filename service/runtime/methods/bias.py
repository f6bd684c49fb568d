"""Bias deltas (BitFit; with null prompts): per module path a delta (out,) added to that module's output, applied
per row through the BiasTable (runtime/bias.py); an artifact may carry a key/value prefix as well."""

from __future__ import annotations

from prefix_store import BackboneMismatch, PrefixArtifact

from ..backbone import Backbone
from .parts import DeviceParts, on_device


def check(bb: Backbone, artifact: PrefixArtifact) -> None:
    """Every delta names a bias this backbone has, with its size."""
    biases = artifact.biases or {}
    sizes = bb.bias_sizes
    if not sizes:
        raise BackboneMismatch(
            f"backbone {bb.name} ({bb.fingerprint.model_type}) has no bias terms: its linear and norm layers are "
            f"bias-free, so a bias ({artifact.method}) task cannot be served on it"
        )
    unknown = sorted(set(biases) - set(sizes))
    if unknown:
        raise BackboneMismatch(
            f"bias deltas for {len(unknown)} modules this backbone does not have, e.g. {unknown[:3]}; its "
            f"{len(sizes)} bias modules are named like {sorted(sizes)[:3]}"
        )
    for name, delta in biases.items():
        if delta.numel() != sizes[name]:
            raise BackboneMismatch(f"bias delta {name}: expected shape ({sizes[name]},), got {tuple(delta.shape)}")


def load(bb: Backbone, artifact: PrefixArtifact) -> DeviceParts:
    assert artifact.biases is not None, "a bias method carries biases (checked at construction)"
    kv = on_device(bb, artifact.kv) if artifact.kv is not None else None
    return DeviceParts(kv=kv, biases={k: on_device(bb, v) for k, v in artifact.biases.items()})
