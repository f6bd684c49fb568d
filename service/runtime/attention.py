"""The attention of a mixed-prefix batch, registered with transformers' AttentionInterface so that the backbone's own
attention modules call it per layer (their projections, rotary embeddings and output layers are untouched).

Each row attends over two key sets: its task's prefix (read from the PrefixPool, stored once per task) and its own
tokens (in its SlotCache slot, or the forward's own tokens for an encoder). Prefix keys carry no position, so rows
of different tasks and prefix lengths share one forward; positions P_i + j were applied to the tokens' keys by the
model before this function sees them.

- decode (one new token per row; rows are slots 0..B-1): the scores of both key sets are computed against the slot
  cache in place and joined before one softmax, so nothing of the cache is copied.
- prefill (T new tokens per row, right-padded; a later chunk of a long prompt sees the earlier ones in its slot):
  SDPA over [prefix | the row's slot tokens], causal within the row.
- encode (bidirectional, no cache): SDPA over [prefix | the forward's tokens].

The runner switches the model to this implementation only for the duration of its own forwards (`serving`), so the
same model keeps transformers' SDPA path for anything else (the trainer's forward, soft-prompt materialisation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .kv_cache import PrefixPool, SlotCache

ATTN_NAME = "prefix_serve"
NEG_INF = float("-inf")


@dataclass
class ForwardState:
    """What every layer's attention needs for one forward of the runner; masks are built once, on first use.

    Args:
        mode: "decode", "prefill" or "encode" (see the module doc).
        pool: the prefix pool.
        prefix_index: (B, Pmax) long, each row's prefix positions in the pool (padding entries are masked).
        prefix_len: (B,) long, each row's prefix length (0: no prefix).
        new: (B,) long, real tokens each row feeds in this forward (the rest of T is right padding).
        cache: the slot cache (decode, prefill).
        slots: (B,) long, each row's slot (prefill; in decode rows are slots 0..B-1).
        past: (B,) long, tokens already in each row's slot before this forward.
    """

    mode: str
    pool: PrefixPool
    prefix_index: torch.Tensor
    prefix_len: torch.Tensor
    new: torch.Tensor
    cache: SlotCache | None = None
    slots: torch.Tensor | None = None
    past: torch.Tensor | None = None
    _mask: torch.Tensor | None = field(default=None, repr=False)
    _S: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.first_chunk = self.past is not None and not bool(self.past.any())

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q (B, H, T, D), this forward's k, v (B, H_kv, T, D) -> attention output (B, T, H, D)."""
        kp, vp = self.pool.gather(layer, self.prefix_index)  # (B, H_kv, Pmax, D)
        if self.mode == "encode":
            return _sdpa(q, torch.cat([kp, k], 2), torch.cat([vp, v], 2), self._encode_mask(k.shape[2]), scale)
        cache, past = self.cache, self.past
        assert cache is not None and past is not None
        B = q.shape[0]
        if self.mode == "decode":
            cache.write_decode(layer, B, past, k, v)
            S = self._decode_width()
            return _decode(q, [(kp, vp), *cache.decode_parts(layer, B, S)], self._bias(S), scale)
        assert self.slots is not None
        cache.write(layer, self.slots, past, k, v)
        if self.first_chunk:  # no earlier tokens in any slot: the keys are this forward's own
            kt, vt, S = k, v, k.shape[2]
        else:
            S = int((past + k.shape[2]).max())
            kt, vt = cache.gather(layer, self.slots, S)  # (B, H_kv, S, D): the prefilling rows' slots
        return _sdpa(q, torch.cat([kp, kt], 2), torch.cat([vp, vt], 2), self._prefill_mask(k.shape[2], S), scale)

    # -- masks (True / 0: attend), shared by every layer -------------------------------------------------------------
    def _prefix_mask(self) -> torch.Tensor:
        Pmax = self.prefix_index.shape[1]
        return torch.arange(Pmax, device=self.new.device)[None] < self.prefix_len[:, None]  # (B, Pmax)

    def _encode_mask(self, T: int) -> torch.Tensor:
        if self._mask is None:
            tokens = torch.arange(T, device=self.new.device)[None] < self.new[:, None]  # (B, T)
            self._mask = torch.cat([self._prefix_mask(), tokens], 1)[:, None, None, :]  # (B, 1, 1, Pmax + T)
        return self._mask

    def _decode_width(self) -> int:
        assert self.past is not None
        if self._S is None:
            self._S = int(self.past.max()) + 1
        return self._S

    def _bias(self, S: int) -> torch.Tensor:
        """Additive mask (B, 1, 1, Pmax + S) for decode: 0 on real keys, -inf elsewhere."""
        if self._mask is None:
            assert self.past is not None
            tokens = torch.arange(S, device=self.new.device)[None] <= self.past[:, None]  # (B, S): 0..past
            keep = torch.cat([self._prefix_mask(), tokens], 1)
            bias = torch.zeros(keep.shape, dtype=self.pool.dtype, device=keep.device).masked_fill(~keep, NEG_INF)
            self._mask = bias[:, None, None, :]
        return self._mask

    def _prefill_mask(self, T: int, S: int) -> torch.Tensor:
        """(B, 1, T, Pmax + S): the prefix, and token j for query i when j <= past + i and j < past + new."""
        if self._mask is None:
            assert self.past is not None
            dev = self.new.device
            j = torch.arange(S, device=dev)[None, None, :]  # (1, 1, S)
            limit = self.past[:, None, None] + torch.arange(T, device=dev)[None, :, None]  # (B, T, 1)
            tokens = (j <= limit) & (j < (self.past + self.new)[:, None, None])  # (B, T, S)
            prefix = self._prefix_mask()[:, None, :].expand(-1, T, -1)  # (B, T, Pmax)
            self._mask = torch.cat([prefix, tokens], 2)[:, None]
        return self._mask


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous()


def _decode(
    q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]], bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per row against several key/value sets, each (B, H_kv, n_i, D): the row's prefix (gathered from the
    pool) and the segments of its slot (views into the cache). The scores of all parts are joined before one softmax,
    so the result is exact and nothing of the cache is copied.

    q (B, H, 1, D); query head h reads key/value head h // (H / H_kv), as transformers' repeat_kv lays them out.
    bias (B, 1, 1, sum n_i): 0 on real keys, -inf elsewhere.
    """
    B, H, _, D = q.shape
    Hkv = parts[0][0].shape[1]
    qg = q.reshape(B, Hkv, H // Hkv, D) * scale  # (B, H_kv, G, D)
    scores = torch.cat([qg @ k.transpose(-1, -2) for k, _ in parts], -1)  # (B, H_kv, G, sum n_i)
    probs = torch.softmax((scores + bias).float(), dim=-1).to(q.dtype)
    out, start = None, 0
    for k, v in parts:
        n = k.shape[2]
        term = probs[..., start : start + n] @ v  # (B, H_kv, G, D)
        out = term if out is None else out + term
        start += n
    assert out is not None
    return out.reshape(B, 1, H, D)


def prefix_serve_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    state: ForwardState | None = kwargs.pop("prefix_serve", None)
    if state is None:  # a forward that is not the runner's: behave as SDPA
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return state.attend(module.layer_idx, query, key, value, scale), None


AttentionInterface.register(ATTN_NAME, prefix_serve_attention)


@contextlib.contextmanager
def serving(config: Any) -> Iterator[None]:
    """Routes the model's attention through `prefix_serve_attention` for the duration of one forward. Without a
    registered mask function transformers builds no mask for it: the masks are ours, from lengths."""
    previous = config._attn_implementation
    config._attn_implementation = ATTN_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
