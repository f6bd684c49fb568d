"""Soft prompts (prompt tuning, P-Tuning): P input embeddings (P, hidden) in front of the tokens.

On a causal LM nothing after the prompt changes its key/values, so they are computed once at load
(Backbone.prompt_kv, positions 0..P-1) and served like a key/value prefix; the row's tokens then take positions
P + j, as PEFT lays them out. On an encoder attention is bidirectional: the prompt is fed as embeddings with every
request (positions from 0, as PEFT feeds them)."""

from __future__ import annotations

from prefix_store import BackboneKind, PrefixArtifact

from ..backbone import Backbone
from .parts import DeviceParts, on_device


def check(bb: Backbone, artifact: PrefixArtifact) -> None:
    """Nothing beyond the common checks (the registry keeps soft prompts off image backbones)."""


def load(bb: Backbone, artifact: PrefixArtifact) -> DeviceParts:
    assert artifact.soft_prompt is not None, "the artifact's method carries soft_prompt (checked at construction)"
    soft = on_device(bb, artifact.soft_prompt)  # (P, hidden)
    if bb.kind is BackboneKind.CAUSAL:
        return DeviceParts(kv=bb.prompt_kv(soft))
    return DeviceParts(embeds=soft)
