"""Key/value prefixes: P-Tuning v2 (free per-layer key/values) and Prefix-Tuning (through an MLP). Trained in the
backbone's cache with the row's tokens at positions P + j, exactly as the server serves them from its pool."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from prefix_store import BackboneFingerprint
from prefix_store.jobs import TrainSpec
from service.runtime import Backbone
from service.runtime.prefix_kv import token_positions

from ..batch import Batch
from .base import Adapter, BuildContext, Hidden, repeat_to, token_type_kwargs


class KVPrefix(Adapter):
    """forward() -> (L, 2, H_kv, P, D)."""

    def hidden(self, bb: Backbone, batch: Batch) -> Hidden:
        x = self()  # (L, 2, H_kv, P, D)
        B, T = batch.ids.shape
        P = x.shape[3]
        cache = DynamicCache()
        for layer in range(x.shape[0]):
            k = x[layer, 0].to(bb.dtype)[None].expand(B, -1, -1, -1)  # (B, H_kv, P, D)
            v = x[layer, 1].to(bb.dtype)[None].expand(B, -1, -1, -1)
            cache.update(k, v, layer)
        mask = torch.cat([batch.mask.new_ones(B, P), batch.mask], 1)  # (B, P + T)
        out = bb.body(
            input_ids=batch.ids,
            attention_mask=mask.long(),
            use_cache=True,
            **bb.with_cache(cache),
            position_ids=token_positions([bb.position_offset + P] * B, batch.lengths, T, batch.ids.device),
            **token_type_kwargs(bb, batch.types),
        )
        return out.last_hidden_state, getattr(out, "pooler_output", None), 0


class DirectKV(KVPrefix):
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


class ReparamKV(KVPrefix):
    """Prefix-Tuning (Li & Liang): embedding -> Linear -> tanh -> Linear, reshaped to per-layer keys/values."""

    def __init__(self, fp: BackboneFingerprint, P: int, mid: int = 512, init: torch.Tensor | None = None) -> None:
        super().__init__()
        self.fp, self.P = fp, P
        self.embedding = nn.Embedding(P, fp.hidden_size)
        if init is not None:  # (P, hidden): real tokens' input embeddings as the MLP's input
            if tuple(init.shape) != (P, fp.hidden_size):
                raise ValueError(
                    f"prefix init: expected embeddings of shape {(P, fp.hidden_size)}, got {tuple(init.shape)}"
                )
            self.embedding.weight.data.copy_(init.detach().float())
        self.mlp = nn.Sequential(
            nn.Linear(fp.hidden_size, mid), nn.Tanh(), nn.Linear(mid, fp.num_layers * 2 * fp.num_kv_heads * fp.head_dim)
        )

    def forward(self) -> torch.Tensor:
        fp = self.fp
        x = self.mlp(self.embedding.weight)  # (P, L·2·H_kv·D)
        return x.view(self.P, fp.num_layers, 2, fp.num_kv_heads, fp.head_dim).permute(1, 2, 3, 0, 4)


@torch.no_grad()
def activation_kv(backbone: Backbone, ids: list[int]) -> torch.Tensor:
    """The frozen backbone's keys/values (L, 2, H_kv, P, D) for the tokens `ids` at the first P positions: what a
    real text of P tokens leaves in the cache (causal LMs: keys with their rotary positions)."""
    embeds = backbone.embeddings(torch.tensor(ids, device=backbone.device))  # (P, hidden)
    return backbone.prompt_kv(embeds).float().cpu()


def build(spec: TrainSpec, ctx: BuildContext) -> KVPrefix:
    """The MLP when spec.reparam (the method's default says which), else free key/values. prefix_init "activations"
    starts from real tokens (init_text's, else drawn from the training inputs): free key/values from the backbone's
    keys/values of them, the MLP's input from their embeddings; "random" from N(0, 1). Unset: activations for free
    key/values (Li & Liang sec. 7.2), random through the MLP (as PEFT starts it)."""
    fp, P = ctx.backbone.fingerprint, spec.num_virtual_tokens or 0
    real = spec.prefix_init == "activations" or (spec.prefix_init is None and not spec.reparam)
    ids = repeat_to(ctx.init_ids or ctx.sample_tokens(P), P) if real else None
    if spec.reparam:
        embeds = ctx.backbone.embeddings(torch.tensor(ids, device=ctx.backbone.device)) if ids else None
        return ReparamKV(fp, P, spec.reparam_hidden, None if embeds is None else embeds.detach().float().cpu())
    return DirectKV(fp, P, activation_kv(ctx.backbone, ids) if ids else None)
