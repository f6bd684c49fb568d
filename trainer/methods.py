"""The trainable part of each method. Each module's forward() returns what the artifact stores:
key/value methods (L, 2, H_kv, P, D); soft-prompt methods (P, hidden). Reparametrisation networks are
training-time only: the exported artifact holds their output, as in the papers and in PEFT.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn
from transformers import DynamicCache

from prefix_store import BackboneFingerprint
from prefix_store.jobs import TrainSpec
from service.runtime import Backbone

# What each method starts from when a job does not say: learning rate, prompt length and warm-up that train well out
# of the box on the shared datasets with a MiniLM-sized encoder (SST-2, MRPC: bench/quality.py measures them).
METHOD_DEFAULTS: dict[str, dict[str, float]] = {
    # SST-2, 300 steps of 32, dev: lr 5e-3 84.7%, 1e-2 85.3%, 2e-2 86.2% (random start). MRPC, 400 steps of 32, lr
    # 2e-2: 68.9% from a random start (the majority class is 68.4%), 73.3% from real tokens' keys/values (prefix_init)
    "p_tuning_v2": {"lr": 2e-2, "num_virtual_tokens": 32, "warmup_ratio": 0.06},
    # The MLP reparametrisation diverges at 2e-3 (59.5%, loss flat); 1e-4 82.2%, 5e-4 84.9%
    "prefix_tuning": {"lr": 5e-4, "num_virtual_tokens": 32, "warmup_ratio": 0.06},
    # 1e-2 85.3%, 3e-2 85.6% (Lester et al. train with 0.3 under Adafactor; AdamW wants less)
    "prompt_tuning": {"lr": 3e-2, "num_virtual_tokens": 32, "warmup_ratio": 0.06},
    "p_tuning": {"lr": 3e-3, "num_virtual_tokens": 32, "warmup_ratio": 0.06},
    # BitFit, biases only (no prompt length), linear head; 150 steps, 600 dev: lr 2e-3 83.8%, 1e-2 82.0%
    "bitfit": {"lr": 2e-3, "warmup_ratio": 0.06},
}
# Visual prompts (Jia et al. sweep large learning rates; P = 10 to 100 in the paper). bench/vpt_digits.py, seed 0,
# P = 8, 300 steps of 32, digits 5-9 / parity, shallow and deep: lr 1e-2 52.0/50.9 | 81.9/82.6 %, 3e-2
# 53.2/54.7 | 83.0/81.9, 1e-1 61.3/61.7 | 80.7/82.2, 3e-1 49.1/58.7 | 80.4/81.7.
METHOD_DEFAULTS |= {
    "vpt_shallow": {"lr": 1e-1, "num_virtual_tokens": 10, "warmup_ratio": 0.06},
    "vpt_deep": {"lr": 1e-1, "num_virtual_tokens": 10, "warmup_ratio": 0.06},
}
# A null prompt's verbalizer starts from the masked-LM scores of its words and wants a larger step: same run,
# lr 2e-3 79.3%, 1e-2 81.2%.
VERBALIZER_LR = 1e-2


def with_method_defaults(spec: TrainSpec) -> TrainSpec:
    """The spec with every field it leaves unset taken from its method's defaults."""
    defaults = dict(METHOD_DEFAULTS[spec.method])
    if spec.verbalizer is not None and spec.method == "bitfit":
        defaults["lr"] = VERBALIZER_LR
    unset = {k: v for k, v in defaults.items() if getattr(spec, k) is None}
    if "num_virtual_tokens" in unset:
        unset["num_virtual_tokens"] = int(unset["num_virtual_tokens"])
    return spec.model_copy(update=unset)


class BiasDeltas(nn.Module):
    """BitFit (Ben Zaken et al.; Logan IV et al. with null prompts): a trainable delta for every bias of the frozen
    backbone, added to the module's output while the task model runs (`applied`), from zeros (the backbone as it
    is). forward() returns path -> delta (out,), what the artifact stores."""

    def __init__(self, targets: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.paths = list(targets)
        self.deltas = nn.ParameterList(
            nn.Parameter(torch.zeros(t.numel(), dtype=torch.float32)) for t in targets.values()
        )

    def forward(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.paths, self.deltas, strict=True))

    @contextlib.contextmanager
    def applied(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        """Every module in `modules` (path -> module) adds its delta to its output, out of place (autograd)."""
        handles = []
        for path, delta in self().items():
            module = modules.get(path)
            if module is not None:  # the masked-LM decoder's bias is applied by the verbalizer, not by a hook
                handles.append(module.register_forward_hook(lambda m, a, out, d=delta: out + d.to(out.dtype)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


class VisualPrompt(nn.Module):
    """VPT (Jia et al.): prompt tokens, (P, hidden) for VPT-shallow or (L, P, hidden) for VPT-deep, initialised as
    the reference code does: uniform in +-sqrt(6 / (3 * patch^2 + hidden))."""

    def __init__(self, shape: tuple[int, ...], patch_size: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        bound = math.sqrt(6.0 / (3 * patch_size * patch_size + shape[-1]))
        self.prompt = nn.Parameter((torch.rand(shape, generator=generator) * 2 - 1) * bound)

    def forward(self) -> torch.Tensor:
        return self.prompt


class DirectKV(nn.Module):
    """P-Tuning v2 (Liu et al.): the deep prompt of every layer is a free parameter.

    init: (L, 2, H_kv, P, D) starting keys/values, e.g. the backbone's own for real tokens (`activation_kv`; Li &
    Liang, sec. 7.2: initialising with activations of real words trains markedly better than random); None: N(0, 1)
    like PEFT's PrefixEncoder embedding without projection."""

    def __init__(self, fp: BackboneFingerprint, P: int, init: torch.Tensor | None = None) -> None:
        super().__init__()
        shape = (fp.num_layers, 2, fp.num_kv_heads, P, fp.head_dim)
        if init is not None and tuple(init.shape) != shape:
            raise ValueError(f"prefix init: expected key/values of shape {shape}, got {tuple(init.shape)}")
        self.kv = nn.Parameter(init.detach().float().clone() if init is not None else torch.randn(shape))

    def forward(self) -> torch.Tensor:
        return self.kv  # (L, 2, H_kv, P, D)


@torch.no_grad()
def activation_kv(backbone: Backbone, ids: list[int]) -> torch.Tensor:
    """The frozen backbone's keys/values (L, 2, H_kv, P, D) for the tokens `ids` at positions 0..P-1: what a real
    text of P tokens leaves in the cache (causal LMs: keys with their rotary positions)."""
    cache = DynamicCache()
    x = torch.tensor([ids], device=backbone.device)  # (1, P)
    backbone.body(input_ids=x, use_cache=True, **backbone.with_cache(cache))
    layers = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]  # each (2, H_kv, P, D)
    return torch.stack(layers).float().cpu()


class ReparamKV(nn.Module):
    """Prefix-Tuning (Li & Liang): embedding -> Linear -> tanh -> Linear, reshaped to per-layer keys/values."""

    def __init__(self, fp: BackboneFingerprint, P: int, mid: int = 512) -> None:
        super().__init__()
        self.fp, self.P = fp, P
        self.embedding = nn.Embedding(P, fp.hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(fp.hidden_size, mid), nn.Tanh(), nn.Linear(mid, fp.num_layers * 2 * fp.num_kv_heads * fp.head_dim)
        )

    def forward(self) -> torch.Tensor:
        fp = self.fp
        x = self.mlp(self.embedding.weight)  # (P, L·2·H_kv·D)
        return x.view(self.P, fp.num_layers, 2, fp.num_kv_heads, fp.head_dim).permute(1, 2, 3, 0, 4)


class SoftPrompt(nn.Module):
    """Prompt tuning (Lester et al.): P free input embeddings, initialised from vocabulary embeddings."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.prompt = nn.Parameter(init.clone())  # (P, hidden)

    def forward(self) -> torch.Tensor:
        return self.prompt


class PromptEncoder(nn.Module):
    """P-Tuning ("GPT Understands, Too"): embeddings through a bidirectional LSTM and an MLP, or an MLP only."""

    def __init__(self, hidden: int, P: int, encoder: str = "lstm") -> None:
        super().__init__()
        self.embedding = nn.Embedding(P, hidden)
        self.encoder = encoder
        if encoder == "lstm":
            self.lstm = nn.LSTM(hidden, hidden // 2, num_layers=2, bidirectional=True, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        elif encoder == "mlp":
            self.mlp = nn.Sequential(
                nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden)
            )
        else:
            raise ValueError(f"p_tuning encoder: expected 'lstm' or 'mlp', got {encoder!r}")

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight  # (P, hidden)
        if self.encoder == "lstm":
            x = self.lstm(x[None])[0][0]
        return self.mlp(x)


def build_prefix(
    method: str,
    fp: BackboneFingerprint,
    P: int,
    *,
    word_embeddings: torch.Tensor | None,
    reparam: bool | None = None,
    mid: int = 512,
    encoder: str = "lstm",
    init_ids: list[int] | None = None,
    generator: torch.Generator | None = None,
    bias_targets: dict[str, torch.Tensor] | None = None,
    patch_size: int = 16,
    kv_init: torch.Tensor | None = None,
) -> nn.Module:
    """The trainable module of `method`.

    Args:
        word_embeddings: (V, hidden) the backbone's input embeddings, to initialise soft prompts.
        reparam: Prefix-Tuning's MLP; on by default for prefix_tuning, off for p_tuning_v2.
        init_ids: prompt tuning from a text: its token ids (repeated to P); otherwise random vocabulary tokens.
        bias_targets: bitfit: the backbone's biases by module path (service.runtime.bias.bias_targets).
        kv_init: p_tuning_v2 without reparametrisation: starting keys/values (L, 2, H_kv, P, D); None: N(0, 1).
    """
    if method in ("vpt_shallow", "vpt_deep"):
        shape = (P, fp.hidden_size) if method == "vpt_shallow" else (fp.num_layers, P, fp.hidden_size)
        return VisualPrompt(shape, patch_size, generator)
    if method == "bitfit":
        if not bias_targets:
            raise ValueError("bitfit: this backbone has no bias terms to train")
        return BiasDeltas(bias_targets)
    if method in ("prefix_tuning", "p_tuning_v2"):
        use_mlp = (method == "prefix_tuning") if reparam is None else reparam
        return ReparamKV(fp, P, mid) if use_mlp else DirectKV(fp, P, kv_init)
    if method == "prompt_tuning":
        assert word_embeddings is not None, "prompt tuning starts from the backbone's word embeddings"
        V = word_embeddings.shape[0]
        ids = init_ids if init_ids else torch.randint(0, V, (P,), generator=generator).tolist()
        ids = (ids * (P // len(ids) + 1))[:P]
        return SoftPrompt(word_embeddings[torch.tensor(ids)].detach().float())
    if method == "p_tuning":
        return PromptEncoder(fp.hidden_size, P, encoder)
    raise ValueError(f"unknown method {method!r}")
