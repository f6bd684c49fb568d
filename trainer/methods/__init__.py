"""How each adapter family is trained: one module per family of the registry (prefix_store/methods.py), each with

    build(spec, ctx) -> Adapter     the trainable module of the job's method, started as its paper starts it

and Adapter subclasses that carry their part of the training forward (base.py). Families never import each other
(an import contract says so). Reparametrisation networks are training-time only: the artifact holds their output,
as in the papers and in PEFT.
"""

from __future__ import annotations

from collections.abc import Callable

from prefix_store import REGISTRY, Family
from prefix_store.jobs import TrainSpec

from . import bias, kv_prefix, low_rank, scaling, soft_prompt, visual_prompt
from .base import Adapter, BuildContext

BUILDERS: dict[Family, Callable[[TrainSpec, BuildContext], Adapter]] = {
    Family.KV_PREFIX: kv_prefix.build,
    Family.SOFT_PROMPT: soft_prompt.build,
    Family.VISUAL_PROMPT: visual_prompt.build,
    Family.BIAS: bias.build,
    Family.LOW_RANK: low_rank.build,
    Family.SCALING: scaling.build,
}
# A null prompt's verbalizer starts from the masked-LM scores of its words and wants a larger step than a bias
# task's linear head (bitfit, same run as its default: lr 2e-3 79.3%, 1e-2 81.2%).
VERBALIZER_LR = 1e-2


def with_method_defaults(spec: TrainSpec) -> TrainSpec:
    """The spec with every field it leaves unset taken from its method's defaults (the registry's)."""
    method = REGISTRY[spec.method]
    defaults = dict(method.defaults)
    if spec.verbalizer is not None and method.family is Family.BIAS:
        defaults["lr"] = VERBALIZER_LR
    return spec.model_copy(update={k: v for k, v in defaults.items() if getattr(spec, k) is None})


def build_adapter(spec: TrainSpec, ctx: BuildContext) -> Adapter:
    """The trainable module of the job's method (its defaults already applied)."""
    return BUILDERS[REGISTRY[spec.method].family](spec, ctx)


__all__ = ["Adapter", "BuildContext", "VERBALIZER_LR", "build_adapter", "with_method_defaults"]
