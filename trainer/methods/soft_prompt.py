"""Soft prompts: prompt tuning (free embeddings) and P-Tuning (embeddings from a prompt encoder). Trained as the
first P input embeddings with positions from 0, the layout PEFT and the server use (on a causal LM the server
serves their key/values, which under causal attention are the same)."""

from __future__ import annotations

import torch
from torch import nn

from prefix_store.jobs import TrainSpec
from service.runtime import Backbone
from service.runtime.prefix_kv import token_positions

from ..batch import Batch
from .base import Adapter, BuildContext, Hidden, repeat_to


class SoftPromptAdapter(Adapter):
    """forward() -> (P, hidden)."""

    def hidden(self, bb: Backbone, batch: Batch) -> Hidden:
        x = self()  # (P, hidden)
        P = x.shape[0]
        B, T = batch.ids.shape
        embeds = torch.cat([x.to(bb.dtype)[None].expand(B, -1, -1), bb.embeddings(batch.ids)], 1)  # (B, P + T, hidden)
        mask = torch.cat([batch.mask.new_ones(B, P), batch.mask], 1)  # (B, P + T)
        lengths = [P + n for n in batch.lengths]
        pos = token_positions([bb.position_offset] * B, lengths, P + T, batch.ids.device)  # (B, P + T)
        kwargs = {}
        if bb.is_encoder:
            types = batch.types if batch.types is not None else torch.zeros_like(batch.ids)
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(B, P), types], 1)
        out = bb.body(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=pos, **kwargs)
        return out.last_hidden_state, getattr(out, "pooler_output", None), P


class SoftPrompt(SoftPromptAdapter):
    """Prompt tuning (Lester et al.): P free input embeddings, initialised from vocabulary embeddings."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.prompt = nn.Parameter(init.clone())  # (P, hidden)

    def forward(self) -> torch.Tensor:
        return self.prompt


class PromptEncoder(SoftPromptAdapter):
    """P-Tuning ("GPT Understands, Too"): embeddings through a bidirectional LSTM and an MLP, or an MLP only."""

    def __init__(self, hidden: int, P: int, encoder: str = "lstm") -> None:
        super().__init__()
        self.encoder = encoder
        self.embedding = nn.Embedding(P, hidden)
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


def build(spec: TrainSpec, ctx: BuildContext) -> SoftPromptAdapter:
    """Through P-Tuning's prompt encoder when spec.reparam (the method's default says which), else prompt tuning's
    free embeddings started from init_text's tokens or from random vocabulary tokens."""
    bb, P = ctx.backbone, spec.num_virtual_tokens or 0
    if spec.reparam:
        return PromptEncoder(bb.fingerprint.hidden_size, P, spec.prompt_encoder)
    words = bb.embeddings.weight  # (V, hidden)
    ids = ctx.init_ids if ctx.init_ids else torch.randint(0, words.shape[0], (P,), generator=ctx.generator).tolist()
    return SoftPrompt(words[torch.tensor(repeat_to(ids, P), device=words.device)].detach().float())  # (P, hidden)
