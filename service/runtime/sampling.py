"""Per-row sampling inside a mixed batch: penalties, the minimum length, temperature, top-k, top-p and min-p, then
one draw per row from its own seeded generator.

Every step processes the logits of all rows at once (B, V): the rows' parameters become (B,) tensors and each
transform is one batched op, skipped when no row asks for it. The order is the one of transformers' generate (and
vLLM's): repetition penalty, presence/frequency penalties, the minimum length, temperature, top-k, top-p, min-p.
The draw is inverse-CDF sampling with one uniform number per row from the row's own generator, so a row's tokens
depend only on its own logits and seed, whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

NEG_INF = float("-inf")


@dataclass
class SamplingParams:
    """What a generation request asks for. temperature 0 means greedy (top_k / top_p / min_p / seed are then unused).

    presence_penalty, frequency_penalty: OpenAI's definitions, over the tokens generated so far:
        logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0).
    repetition_penalty: transformers' (Keskar et al.), over the prompt and the generated tokens: a seen token's
        logit is divided by it when positive, multiplied when negative.
    min_tokens: the end-of-sequence and stop token ids cannot be drawn before this many tokens.
    top_logprobs: this many most likely alternatives (with their log-probabilities) per generated token.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    min_p: float = 0.0  # 0: no min-p cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False  # the log-probability of every prompt token but the first (echo)
    grammar: str | None = None  # structured output: a compiled grammar (grammar.Grammars.compile)
    return_logits: bool = False  # tests and benchmarks: hand back each step's full logits row

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def counts_tokens(self) -> bool:
        """Whether the row's penalties need the counts of its generated (and prompt) tokens."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def cuts(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A row's generator. It draws one uniform number per step on the CPU (the draw's cost does not grow with the
    vocabulary), whatever device the logits are on."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


@dataclass
class TokenHistory:
    """The tokens the penalties look at, for B rows: counts (B, V) float of each row's generated tokens, seen (B, V)
    bool of its prompt and generated tokens. None where no row of the step needs them."""

    counts: torch.Tensor
    seen: torch.Tensor


def penalise(logits: torch.Tensor, params: list[SamplingParams], history: TokenHistory | None) -> torch.Tensor:
    """Repetition, presence and frequency penalties on logits (B, V) float, in place: only the rows that ask for them
    are touched."""
    rows = [i for i, p in enumerate(params) if p.counts_tokens]
    if history is None or not rows:
        return logits
    dev = logits.device
    idx = torch.tensor(rows, device=dev)
    x = logits[idx]  # (n, V), a copy
    rep = torch.tensor([params[i].repetition_penalty for i in rows], device=dev)[:, None]  # (n, 1)
    if bool((rep != 1.0).any()):
        # seen is sparse (the prompt's and the output's tokens): update just those entries
        r, c = history.seen[idx].nonzero(as_tuple=True)
        v, scale = x[r, c], rep[r, 0]
        x[r, c] = torch.where(v < 0, v * scale, v / scale)
    freq = torch.tensor([params[i].frequency_penalty for i in rows], device=dev)[:, None]
    pres = torch.tensor([params[i].presence_penalty for i in rows], device=dev)[:, None]
    if bool((freq != 0).any() or (pres != 0).any()):
        counts = history.counts[idx]
        x.sub_(counts.mul(freq).add_(counts.clamp(max=1.0).mul_(pres)))  # counts are whole: clamp is (count > 0)
    logits[idx] = x
    return logits


def forbid_ending(logits: torch.Tensor, rows: list[tuple[int, list[int]]]) -> torch.Tensor:
    """min_tokens: rows (index, ending token ids) that may not end yet get -inf on those ids."""
    for i, ids in rows:  # only rows still under their minimum: few, and each a single indexed write
        logits[i, ids] = NEG_INF
    return logits


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p for every row at once: logits (B, V) float -> scaled logits with the cut
    entries at -inf. Greedy rows are left as they are (their argmax does not change). Always keeps the most likely
    token of each row."""
    dev = logits.device
    temp = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=dev)[:, None]
    x = logits / temp
    if not any(p.cuts for p in params):
        return x
    V = x.shape[-1]
    top_k = torch.tensor([p.top_k if p.cuts and 0 < p.top_k < V else V for p in params], device=dev)[:, None]
    top_p = torch.tensor([p.top_p if p.cuts else 1.0 for p in params], device=dev)[:, None]
    min_p = torch.tensor([p.min_p if p.cuts else 0.0 for p in params], device=dev)[:, None]
    sorted_x, order = torch.sort(x, dim=-1, descending=True)  # (B, V)
    rank = torch.arange(V, device=dev)[None]  # (1, V)
    # top-k: ties with the k-th value stay (as transformers' TopKLogitsWarper keeps every score >= the k-th)
    kth = sorted_x.gather(1, top_k - 1)  # (B, 1)
    drop = sorted_x < kth
    sorted_x = sorted_x.masked_fill(drop, NEG_INF)
    probs = torch.softmax(sorted_x, dim=-1)
    # top-p: drop a token when the tokens ranked above it already hold top_p of the mass (rows with top_p 1 skip it:
    # rounding can take the sum above a tail token to 1.0)
    drop |= ((torch.cumsum(probs, dim=-1) - probs) >= top_p) & (top_p < 1.0)
    # min-p: drop a token less likely than min_p times the most likely one
    drop |= probs < min_p * probs[:, :1]
    drop &= rank > 0
    return x.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), NEG_INF)


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Next tokens (B,) from processed logits (B, V): argmax for greedy rows; for the others inverse-CDF sampling of
    softmax(filter_logits) with one uniform number per row from the row's generator."""
    out = torch.argmax(logits, dim=-1)  # (B,)
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if not drawn:
        return out
    idx = torch.tensor(drawn, device=logits.device)
    probs = torch.softmax(filter_logits(logits[idx], [params[i] for i in drawn]), dim=-1)  # (n, V)
    u = torch.cat([torch.rand(1, generator=generators[i]) for i in drawn]).to(logits.device)  # (n,)
    cdf = torch.cumsum(probs, dim=-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=logits.shape[-1] - 1)[:, 0]
    # A token of probability 0 sits on a flat stretch of the CDF; searchsorted lands on the first index whose CDF
    # reaches u, which always has probability > 0.
    out[idx] = pick
    return out


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under the model's own distribution (before penalties, temperature or cuts), (B,)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None])[:, 0]


def alternatives(logprobs: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """The k most likely tokens of each row of log-probabilities (n, V): per row (token id, log-probability), most
    likely first."""
    values, ids = torch.topk(logprobs, k, dim=-1)  # (n, k) each
    return [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
