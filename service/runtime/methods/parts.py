"""What a family module hands the engine: the device tensors of one artifact, by where the forward reads them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from prefix_store import PrefixArtifact

from ..backbone import Backbone


@dataclass
class DeviceParts:
    """One artifact's tensors on the device, in the backbone's dtype.

    kv: (L, 2, H_kv, P, D) key/values every token of the row attends to, placed in the PrefixPool and read by the
        registered attention; None when the family has none.
    embeds: (P, hidden) input embeddings the row's tokens are preceded by (text encoders: in front of the tokens;
        image encoders: after [CLS]); None when none.
    biases: module path -> (out,) deltas added to those modules' outputs through the BiasTable; None when none.
    """

    kv: torch.Tensor | None = None
    embeds: torch.Tensor | None = None
    biases: dict[str, torch.Tensor] | None = None


def on_device(bb: Backbone, t: torch.Tensor) -> torch.Tensor:
    return t.to(device=bb.device, dtype=bb.dtype)


class FamilyModule(Protocol):
    """What each family module (kv_prefix.py, soft_prompt.py, ...) provides, as module-level functions."""

    def check(self, bb: Backbone, artifact: PrefixArtifact) -> None: ...

    def load(self, bb: Backbone, artifact: PrefixArtifact) -> DeviceParts: ...
