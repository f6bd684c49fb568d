"""Low-rank updates (LoRA, Hu et al. 2021): per adapted projection trainable factors A (r, in) and B (out, r), the
projection's output gaining `x A^T B^T * lora_alpha / r` while the task model runs. Started as PEFT starts them
(`init_lora_weights=True`): A Kaiming-uniform, B zeros, so training starts from the backbone as it is. The server
applies the same update per row through its LowRankTable (service/runtime/low_rank.py) on the same projections
(backbone.linear_modules), and the artifact exports to a PEFT LORA adapter (prefix_store/peft_io.py)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from prefix_store import LowRank
from prefix_store.jobs import TrainSpec
from service.runtime import Backbone
from service.runtime.backbone import linear_features, linear_modules

from ..batch import Batch
from .base import Adapter, BuildContext, Hidden, adapted_modules, plain_hidden, removing

# What a job that names no target_modules adapts, by model type: PEFT's defaults
# (peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, copied: PEFT is no dependency of the
# trainer; tests/trainer/test_lora_ia3_train.py checks the copy), and for the served families PEFT has no entry for,
# the same choice: the attention's query and value projections, or the fused projection that holds them.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        (
            "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "stablelm", "opt", "starcoder2",
            "cohere", "olmo2", "gpt_oss",
        ),
        ("q_proj", "v_proj"),
    ),
    "phi3": ("qkv_proj",),
    "gpt_neox": ("query_key_value",),
    "gpt2": ("c_attn",),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra"), ("query", "value")),
}  # fmt: skip


class LowRankUpdates(Adapter):
    """forward() returns path -> (A (r, in), B (out, r)); the artifact stores them with the scale."""

    def __init__(self, sizes: dict[str, tuple[int, int]], r: int, scale: float, generator: torch.Generator) -> None:
        super().__init__()
        self.paths = list(sizes)
        self.scale = scale
        self.a = nn.ParameterList()
        self.b = nn.ParameterList()
        for n_in, n_out in sizes.values():
            a = torch.empty(r, n_in)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # PEFT's start of lora_A
            self.a.append(nn.Parameter(a))
            self.b.append(nn.Parameter(torch.zeros(n_out, r)))

    def forward(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {path: (a, b) for path, a, b in zip(self.paths, self.a, self.b, strict=True)}

    def hidden(self, bb: Backbone, batch: Batch) -> Hidden:
        """A plain forward: the updates enter through the hooks of `applied`."""
        return plain_hidden(bb, batch)

    @contextlib.contextmanager
    def applied(self, bb: Backbone) -> Iterator[None]:
        """Every adapted projection adds its update to its output, out of place (autograd), as the server's hook adds
        it in place: `(x A^T) B^T * scale` on the module's input x (B, T, in)."""
        modules = linear_modules(bb.body)
        handles = []
        for path, (a, b) in self().items():

            def add_update(m: nn.Module, args: Any, out: torch.Tensor, a: Any = a, b: Any = b) -> torch.Tensor:
                x = args[0]
                return out + ((x.to(a.dtype) @ a.T) @ b.T * self.scale).to(out.dtype)

            handles.append(modules[path].register_forward_hook(add_update))
        with removing(handles):
            yield

    def artifact_tensors(self, method: str) -> dict[str, Any]:
        return {
            "low_rank": {
                path: LowRank(a.detach().float().cpu().clone(), b.detach().float().cpu().clone(), self.scale)
                for path, (a, b) in self().items()
            }
        }


def build(spec: TrainSpec, ctx: BuildContext) -> LowRankUpdates:
    bb = ctx.backbone
    r, alpha = spec.lora_r, spec.lora_alpha
    assert r is not None and alpha is not None, "the method's defaults set them (with_method_defaults)"
    if r > bb.max_lora_rank:
        raise ValueError(
            f"lora_r {r} is over this backbone's limit of {bb.max_lora_rank} (PREFIXSERVE_MAX_LORA_RANK): the server "
            "would refuse the artifact"
        )
    names = spec.target_modules or DEFAULT_TARGETS.get(bb.fingerprint.model_type)
    if names is None:
        raise ValueError(
            f"{spec.method}: no default target_modules for model type {bb.fingerprint.model_type!r}: name the "
            "projections to adapt (target_modules)"
        )
    modules = adapted_modules(bb, names, spec.method)
    sizes = {path: linear_features(m) for path, m in modules.items()}
    return LowRankUpdates(sizes, r, alpha / r, ctx.generator)
