"""How each adapter family is served: one module per family of the registry (prefix_store/methods.py), each with

    check(bb, artifact) -> None          what the family needs of the backbone beyond the common checks
    load(bb, artifact) -> DeviceParts    the artifact's device tensors, by where the forward reads them

Families never import each other (an import contract says so); what they share lives in parts.py or below the
package (backbone.py, bias.py, low_rank.py, scaling.py). The engine calls `check` and `load` here, never a family
directly.
"""

from __future__ import annotations

from prefix_store import Family, PrefixArtifact

from ..backbone import Backbone
from . import bias, kv_prefix, low_rank, scaling, soft_prompt, visual_prompt
from .parts import DeviceParts, FamilyModule

FAMILIES: dict[Family, FamilyModule] = {
    Family.KV_PREFIX: kv_prefix,
    Family.SOFT_PROMPT: soft_prompt,
    Family.VISUAL_PROMPT: visual_prompt,
    Family.BIAS: bias,
    Family.LOW_RANK: low_rank,
    Family.SCALING: scaling,
}


def check(bb: Backbone, artifact: PrefixArtifact) -> None:
    """Refuses an artifact this backbone cannot serve, naming the difference (BackboneMismatch)."""
    bb.check_common(artifact)
    FAMILIES[artifact.spec.family].check(bb, artifact)


def load(bb: Backbone, artifact: PrefixArtifact) -> DeviceParts:
    """The artifact checked, then its tensors on the device."""
    check(bb, artifact)
    return FAMILIES[artifact.spec.family].load(bb, artifact)


__all__ = ["FAMILIES", "DeviceParts", "FamilyModule", "check", "load"]
