"""Channel scaling ((IA)^3, Liu et al. 2022): per adapted projection a trainable vector multiplying its output (out,)
channel by channel (keys, values: `W x + b` scaled, the bias with it), or, for a feed-forward projection, its input
(in,) before the projection (`W (x * l) + b`), as PEFT's IA3 layers do. Started at ones, as PEFT starts them
(`init_ia3_weights=True`): the backbone as it is. The server applies the same vectors per row through its ScaleTable
(service/runtime/scaling.py) on the same projections (backbone.linear_modules), and the artifact exports to a PEFT
IA3 adapter (prefix_store/peft_io.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from prefix_store import ChannelScale
from prefix_store.jobs import ALL_LINEAR, TrainSpec
from service.runtime import Backbone
from service.runtime.backbone import linear_features, linear_modules

from ..batch import Batch
from .base import Adapter, BuildContext, Hidden, adapted_modules, plain_hidden, removing

# What a job that names no target_modules / feedforward_modules scales, by model type: PEFT's defaults
# (peft.utils.constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and ..._FEEDFORWARD_MODULES_MAPPING, copied:
# PEFT is no dependency of the trainer; tests/trainer/test_lora_ia3_train.py checks the copy), and for the served
# families PEFT has no entry for, the same choice: keys and values, and the MLP's down projection on its input
# (gpt_oss's experts are no linear modules: keys and values only).
_LLAMA_LIKE = (("k_proj", "v_proj", "down_proj"), ("down_proj",))
_QWEN_LIKE = (("q_proj", "v_proj", "down_proj"), ("down_proj",))
_BERT_LIKE = (("key", "value", "output.dense"), ("output.dense",))
DEFAULTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # model type -> (targets, feed-forward ones)
    **dict.fromkeys(("llama", "mistral", "stablelm", "cohere", "olmo2"), _LLAMA_LIKE),
    **dict.fromkeys(("qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"), _QWEN_LIKE),
    "phi3": (("qkv_proj", "down_proj"), ("down_proj",)),
    "starcoder2": (("k_proj", "v_proj", "mlp.c_proj"), ("mlp.c_proj",)),
    "gpt_oss": (("k_proj", "v_proj"), ()),
    "opt": (("q_proj", "k_proj", "fc2"), ("fc2",)),
    "gpt_neox": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra"), _BERT_LIKE),
}


class ChannelScales(Adapter):
    """forward() returns path -> vector; which side each scales is `on_input`."""

    def __init__(self, sides: dict[str, tuple[int, bool]]) -> None:
        super().__init__()
        self.paths = list(sides)
        self.on_input = [on_input for _, on_input in sides.values()]
        self.vectors = nn.ParameterList(nn.Parameter(torch.ones(width)) for width, _ in sides.values())

    def forward(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.paths, self.vectors, strict=True))

    def hidden(self, bb: Backbone, batch: Batch) -> Hidden:
        """A plain forward: the vectors enter through the hooks of `applied`."""
        return plain_hidden(bb, batch)

    @contextlib.contextmanager
    def applied(self, bb: Backbone) -> Iterator[None]:
        """Every scaled projection multiplies its output (a forward hook) or its input (a pre-hook) by its vector,
        out of place (autograd), as the server's hooks do in place."""
        modules = linear_modules(bb.body)
        handles = []
        for (path, vector), on_input in zip(self().items(), self.on_input, strict=True):
            module = modules[path]
            if on_input:

                def scale_input(m: nn.Module, args: Any, v: Any = vector) -> Any:
                    return (args[0] * v.to(args[0].dtype), *args[1:])

                handles.append(module.register_forward_pre_hook(scale_input))
            else:

                def scale_output(m: nn.Module, args: Any, out: torch.Tensor, v: Any = vector) -> torch.Tensor:
                    return out * v.to(out.dtype)

                handles.append(module.register_forward_hook(scale_output))
        with removing(handles):
            yield

    def artifact_tensors(self, method: str) -> dict[str, Any]:
        return {
            "scales": {
                path: ChannelScale(v.detach().float().cpu().clone(), on_input)
                for (path, v), on_input in zip(self().items(), self.on_input, strict=True)
            }
        }


def build(spec: TrainSpec, ctx: BuildContext) -> ChannelScales:
    bb = ctx.backbone
    targets, feedforward = DEFAULTS.get(bb.fingerprint.model_type, (None, ()))
    if spec.target_modules is not None:
        targets = tuple(spec.target_modules)
    if spec.feedforward_modules is not None:
        feedforward = tuple(spec.feedforward_modules)
        if not set(feedforward) <= set(targets or ()) and targets != (ALL_LINEAR,):
            raise ValueError(
                f"{spec.method} feedforward_modules {sorted(set(feedforward) - set(targets or ()))}: not among "
                "target_modules (PEFT's rule: the feed-forward modules are some of the targets)"
            )
    if targets is None:
        raise ValueError(
            f"{spec.method}: no default target_modules for model type {bb.fingerprint.model_type!r}: name the "
            "projections to scale (target_modules, and feedforward_modules for those scaled on their input)"
        )
    sides = {}
    for path, module in adapted_modules(bb, targets, spec.method).items():
        n_in, n_out = linear_features(module)
        # PEFT's test (IA3Model._check_target_module_feedforward): the path ends with a feed-forward name
        on_input = any(path.endswith(name) for name in feedforward)
        sides[path] = (n_in if on_input else n_out, on_input)
    return ChannelScales(sides)
