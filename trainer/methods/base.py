"""What every trainable adapter module is: its parameters, its part of the training forward, and the artifact
tensors it exports. Each family module (kv_prefix.py, soft_prompt.py, ...) subclasses Adapter and provides
`build(spec, ctx) -> Adapter`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prefix_store import REGISTRY
from prefix_store.jobs import ALL_LINEAR
from service.runtime import Backbone
from service.runtime.backbone import linear_modules
from service.runtime.prefix_kv import token_positions

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


def plain_hidden(bb: Backbone, batch: Batch) -> Hidden:
    """The backbone's own forward on the batch, laid out as the server lays out a row without a prompt: what the
    methods that change the frozen modules (bias deltas, low-rank updates, scales) run, their change in effect
    through the hooks of `Adapter.applied`."""
    B, T = batch.ids.shape
    out = bb.body(
        input_ids=batch.ids,
        attention_mask=batch.mask.long(),
        position_ids=token_positions([bb.position_offset] * B, batch.lengths, T, batch.ids.device),
        **token_type_kwargs(bb, batch.types),
    )
    return out.last_hidden_state, getattr(out, "pooler_output", None), 0


def named_by(path: str, names: Sequence[str]) -> bool:
    """Whether one of `names` names the module at `path` as PEFT's target_modules do: the whole path, or its last
    dotted parts (q_proj names layers.0.self_attn.q_proj)."""
    return any(path == n or path.endswith("." + n) for n in names)


def adapted_modules(bb: Backbone, names: Sequence[str], method: str) -> dict[str, nn.Module]:
    """The projections of the body that `names` picks (named_by, or ALL_LINEAR: every one), by path: the modules the
    server adapts (backbone.linear_modules), so that what is trained is what can be served. A name that picks no
    projection is refused, a typo or another family's name rather than a silent no-op."""
    modules = linear_modules(bb.body)
    if list(names) == [ALL_LINEAR]:
        return modules
    picked = {path: m for path, m in modules.items() if named_by(path, names)}
    missing = [n for n in names if not any(named_by(path, [n]) for path in picked)]
    if missing:
        raise ValueError(
            f"{method} target_modules {missing}: no linear projection of {bb.name} ({bb.fingerprint.model_type}) is "
            f"named so; its {len(modules)} projections are named like {sorted(modules)[:4]}"
        )
    return picked


def repeat_to(ids: list[int], P: int) -> list[int]:
    """`ids` repeated (or cut) to exactly P tokens: a start text shorter or longer than the prompt."""
    if not ids:
        raise ValueError("a prompt start needs at least one token")
    return (ids * (P // len(ids) + 1))[:P]


@contextlib.contextmanager
def removing(handles: list[Any]) -> Iterator[None]:
    """Keeps the hooks `handles` registered for the block (an Adapter's `applied`) and removes them after it,
    whatever happens inside."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()
