"""Bias deltas (BitFit, Ben Zaken et al.; with null prompts, Logan IV et al.): a trainable delta for every bias of
the frozen backbone, added to the module's output while the task model runs, from zeros (the backbone as it is).
The server applies the same deltas per row through its BiasTable (service/runtime/bias.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from prefix_store.jobs import TrainSpec
from service.runtime import Backbone
from service.runtime.bias import MLM_BIAS, bias_modules, bias_targets

from ..batch import Batch
from .base import Adapter, BuildContext, Hidden, plain_hidden, removing


class BiasDeltas(Adapter):
    """forward() returns path -> delta (out,), what the artifact stores."""

    def __init__(self, targets: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.paths = list(targets)
        self.deltas = nn.ParameterList(
            nn.Parameter(torch.zeros(t.numel(), dtype=torch.float32)) for t in targets.values()
        )

    def forward(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.paths, self.deltas, strict=True))

    def hidden(self, bb: Backbone, batch: Batch) -> Hidden:
        """A plain forward: the deltas enter through the hooks of `applied`."""
        return plain_hidden(bb, batch)

    @contextlib.contextmanager
    def applied(self, bb: Backbone) -> Iterator[None]:
        """Every biased module of the backbone adds its delta to its output, out of place (autograd)."""
        modules = bias_modules(bb)  # path -> module
        handles = []
        for path, delta in self().items():
            module = modules.get(path)
            if module is not None:  # the masked-LM decoder's bias is applied by the verbalizer, not by a hook
                handles.append(module.register_forward_hook(lambda m, a, out, d=delta: out + d.to(out.dtype)))
        with removing(handles):
            yield

    def label_delta(self, verb: torch.Tensor) -> torch.Tensor | None:
        delta = self().get(MLM_BIAS)  # (V,) the masked-LM decoder's bias delta, when the backbone has one
        return None if delta is None else delta[verb]

    def artifact_tensors(self, method: str) -> dict[str, Any]:
        return {"biases": {k: v.detach().float().cpu().clone() for k, v in self().items()}}


def build(spec: TrainSpec, ctx: BuildContext) -> BiasDeltas:
    targets = bias_targets(ctx.backbone)
    if not targets:
        raise ValueError(f"{spec.method}: this backbone has no bias terms to train")
    return BiasDeltas(targets)
