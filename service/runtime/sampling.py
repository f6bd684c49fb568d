"""Per-row sampling: greedy, temperature, top-k, top-p, each row with its own seeded generator.

A row's draw depends only on its own logits and its own generator, so the same seed gives the same tokens
whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """What a generation request asks for. temperature 0 means greedy (top_k / top_p / seed are then unused)."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    return_logits: bool = False  # tests and benchmarks: hand back each step's full logits row

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Scaled and cut logits (V,) for one row; cut entries become -inf. Always keeps the most likely token."""
    x = logits.float() / temperature
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return x


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Next tokens (B,) for logits (B, V)."""
    out = torch.argmax(logits, dim=-1)  # (B,)
    for i, p in enumerate(params):
        if not p.greedy:
            probs = torch.softmax(filter_logits(logits[i], p.temperature, p.top_k, p.top_p), dim=-1)
            out[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return out


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under the model's own distribution (before temperature or cuts), (B,)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None])[:, 0]
