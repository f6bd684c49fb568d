"""What a family module hands the engine: the device tensors of one artifact, by where the forward reads them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from prefix_store import BackboneMismatch, PrefixArtifact, UnsupportedAdapter

from ..backbone import Backbone


@dataclass
class DeviceParts:
    """One artifact's tensors on the device, in the backbone's dtype.

    kv: (L, 2, H_kv, P, D) key/values every token of the row attends to, placed in the PrefixPool and read by the
        registered attention; None when the family has none.
    embeds: (P, hidden) input embeddings the row's tokens are preceded by (text encoders: in front of the tokens;
        image encoders: after [CLS]); None when none.
    biases: module path -> (out,) deltas added to those modules' outputs through the BiasTable; None when none.
    low_rank: module path -> (A (r, in), B (out, r)), the scale folded into B, whose update `x A^T B^T` is added to
        those modules' outputs through the LowRankTable (runtime/low_rank.py); None when none.
    scales: module path -> (vector, on_input), multiplying those modules' outputs (out,) or inputs (in,) through the
        ScaleTable (runtime/scaling.py); None when none.
    """

    kv: torch.Tensor | None = None
    embeds: torch.Tensor | None = None
    biases: dict[str, torch.Tensor] | None = None
    low_rank: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    scales: dict[str, tuple[torch.Tensor, bool]] | None = None


def on_device(bb: Backbone, t: torch.Tensor) -> torch.Tensor:
    return t.to(device=bb.device, dtype=bb.dtype)


# First names of the modules transformers puts beside a model's body: LM heads (GPT-NeoX's embed_out), BERT's MLM
# head, classification heads. The serving backbone may not hold them (an encoder is served bare), so the name tells.
HEAD_MODULES = frozenset({"lm_head", "embed_out", "cls", "classifier", "score", "generator_lm_head", "qa_outputs"})


def unadaptable(bb: Backbone, path: str, what: str) -> Exception:
    """Why a `what` ("LoRA", "IA3") task's module `path` is no projection of this backbone's body: a head (the LM
    head, an MLM or classification head) or a body module that is no projection is refused as not served
    (UnsupportedAdapter, 400); a name this model does not have at all is another backbone's (BackboneMismatch)."""
    try:
        module = bb.model.get_submodule(path)
    except AttributeError:
        module = None
    first = path.split(".")[0]
    if (module is not None and module is bb.lm_head) or first in ("lm_head", "embed_out"):
        return UnsupportedAdapter(f"{what} on the LM head ({path}) is not served, only on the body's projections")
    body_module = dict(bb.body.named_modules()).get(path)
    if body_module is not None:
        kind = "embedding" if "Embedding" in type(body_module).__name__ else type(body_module).__name__
        return UnsupportedAdapter(
            f"{what} on {path} ({kind}) is not served: only on the body's linear projections (nn.Linear, Conv1D)"
        )
    if module is not None or first in HEAD_MODULES:
        return UnsupportedAdapter(
            f"{what} on {path} is not served: it belongs to a head outside the backbone's body (masked-LM or "
            "classification), and only the body's linear projections are adapted"
        )
    sizes = bb.linear_sizes
    return BackboneMismatch(
        f"{what} module {path}: this backbone has no such projection; its {len(sizes)} projections are named like "
        f"{sorted(sizes)[:3]}"
    )


class FamilyModule(Protocol):
    """What each family module (kv_prefix.py, soft_prompt.py, ...) provides, as module-level functions."""

    def check(self, bb: Backbone, artifact: PrefixArtifact) -> None: ...

    def load(self, bb: Backbone, artifact: PrefixArtifact) -> DeviceParts: ...
