"""What every trainable adapter module is: its parameters, its part of the training forward, and the artifact
tensors it exports. Each family module (kv_prefix.py, soft_prompt.py, ...) subclasses Adapter and provides
`build(spec, ctx) -> Adapter`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prefix_store import REGISTRY
from service.runtime import Backbone

from ..batch import Batch

Hidden = tuple[torch.Tensor, torch.Tensor | None, int]  # (states (B, off + T, hidden), pooler (B, hidden) or None, off)


@dataclass
class BuildContext:
    """What a family's build() may draw on besides the job's spec.

    backbone: the frozen backbone (its geometry, embeddings, biases).
    generator: the job's seeded generator (random starts are reproducible).
    init_ids: the token ids of the job's init_text, or None.
    sample_tokens: n -> n token ids drawn (seeded) from the training inputs, for starts from real tokens.
    """

    backbone: Backbone
    generator: torch.Generator
    init_ids: list[int] | None
    sample_tokens: Callable[[int], list[int]]


class Adapter(nn.Module):
    """A method's trainable module. forward() returns what the artifact stores under the method's field."""

    def hidden(self, bb: Backbone, batch: Batch) -> Hidden:
        """The backbone's states on `batch` with the adapter in effect, laid out as the server lays out a row."""
        raise NotImplementedError

    def applied(self, bb: Backbone) -> contextlib.AbstractContextManager[None]:
        """What must be in effect around the whole forward (bias deltas' hooks); nothing by default."""
        return contextlib.nullcontext()

    def label_delta(self, verb: torch.Tensor) -> torch.Tensor | None:
        """(C,) a verbalizer's decoder-bias delta at its label tokens verb (C,); None without one."""
        return None

    def artifact_tensors(self, method: str) -> dict[str, Any]:
        """The trained tensors, copied (the parameters keep training), under the method's artifact field."""
        (name,) = REGISTRY[method].fields
        return {name: self().detach().float().cpu().clone()}


def token_type_kwargs(bb: Backbone, types: torch.Tensor | None) -> dict[str, Any]:
    """Encoders take token type ids (segment A/B); decoders take none."""
    return {"token_type_ids": types} if bb.is_encoder else {}


def repeat_to(ids: list[int], P: int) -> list[int]:
    """`ids` repeated (or cut) to exactly P tokens: a start text shorter or longer than the prompt."""
    if not ids:
        raise ValueError("a prompt start needs at least one token")
    return (ids * (P // len(ids) + 1))[:P]
