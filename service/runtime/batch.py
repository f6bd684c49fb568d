"""The running decode batch: its rows, their key/value cache, key mask, next positions and next tokens.

Row i's cache columns hold, in some order, its prefix keys and the keys of every token it has seen; `mask` says
which columns are real. Columns carry no meaning beyond that (positions were applied when the keys were made),
so batches of different widths merge by padding columns, and leaving rows free columns by compaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .output import TextStream
from .prefix_kv import compaction_index, pad_columns
from .step import EngineRequest


class GrowingLayer(DynamicLayer):
    """A cache layer whose keys/values live in a buffer with spare columns. Appending writes in place; the
    buffer doubles when full. DynamicLayer instead `torch.cat`s the whole cache at every step, a fresh
    allocation and a full copy per token that dominated decode time on CPU."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, spare: int = 32) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        B, H, S, D = keys.shape
        self._k = keys.new_empty(B, H, S + spare, D)
        self._v = values.new_empty(B, H, S + spare, D)
        self._k[:, :, :S] = keys
        self._v[:, :, :S] = values
        self._set_length(S)

    def _set_length(self, S: int) -> None:
        self.length = S
        self.keys, self.values = self._k[:, :, :S], self._v[:, :, :S]  # views: (B, H_kv, S, D)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        S, n = self.length, key_states.shape[-2]
        if S + n > self._k.shape[2]:
            grow = max(S + n, 2 * self._k.shape[2]) - self._k.shape[2]
            self._k = torch.cat([self._k, self._k.new_empty(*self._k.shape[:2], grow, self._k.shape[3])], dim=2)
            self._v = torch.cat([self._v, self._v.new_empty(*self._v.shape[:2], grow, self._v.shape[3])], dim=2)
        self._k[:, :, S : S + n] = key_states
        self._v[:, :, S : S + n] = value_states
        self._set_length(S + n)
        return self.keys, self.values


def cache_from(keys: list[torch.Tensor], values: list[torch.Tensor], spare: int = 32) -> DynamicCache:
    """A DynamicCache over per-layer (B, H_kv, S, D) tensors, with room for `spare` more columns per layer."""
    cache = DynamicCache()
    cache.layers.extend(GrowingLayer(k, v, spare) for k, v in zip(keys, values, strict=True))
    return cache


@dataclass
class Row:
    """One running generation row: its request, its sampler (None: greedy) and its output so far."""

    request: EngineRequest
    generator: torch.Generator | None
    text: TextStream

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class KVState:
    """Key/value state of some rows, without the rows: what a prefill hands over before the rows are built.

    cache: per layer keys/values (B, H_kv, S, D) in GrowingLayers, appended to in place by each decode forward.
    mask: (B, S) bool, True for real key columns.
    next_pos: (B,) long, the position id of the next token each row feeds.
    """

    cache: DynamicCache
    mask: torch.Tensor
    next_pos: torch.Tensor


@dataclass
class DecodeBatch:
    """Args:
    rows: row i of every tensor belongs to rows[i].
    kv: their key/value cache, key mask and next positions.
    tokens: (B,) long, the token each row feeds at the next decode step.
    """

    rows: list[Row]
    kv: KVState
    tokens: torch.Tensor

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return self.kv.mask.shape[1]

    @property
    def reserved_tokens(self) -> int:
        return sum(r.request.reserved_tokens for r in self.rows)

    def filter(self, keep: list[int]) -> DecodeBatch | None:
        """The batch restricted to rows `keep` (in that order), or None when no row is left."""
        if not keep:
            return None
        if keep == list(range(len(self))):
            return self
        idx = torch.tensor(keep, device=self.kv.mask.device)
        layers = self.kv.cache.layers
        cache = cache_from([layer.keys[idx] for layer in layers], [layer.values[idx] for layer in layers])
        out = DecodeBatch(
            [self.rows[i] for i in keep], KVState(cache, self.kv.mask[idx], self.kv.next_pos[idx]), self.tokens[idx]
        )
        out.compact()
        return out

    def compact(self, max_waste: float = 0.5) -> None:
        """Right-aligns each row's real keys when more than `max_waste` of the columns are masked, so attention
        cost follows the longest live row rather than the history of rows that have left."""
        kv = self.kv
        real = int(kv.mask.sum(1).max())
        if real >= self.width * (1 - max_waste):
            return
        idx = compaction_index(kv.mask)  # (B, S')
        layers = kv.cache.layers
        gather = idx[:, None, :, None].expand(-1, layers[0].keys.shape[1], -1, layers[0].keys.shape[3])
        kv.cache = cache_from(
            [torch.gather(layer.keys, 2, gather) for layer in layers],
            [torch.gather(layer.values, 2, gather) for layer in layers],
        )
        kv.mask = torch.gather(kv.mask, 1, idx)

    @staticmethod
    def concatenate(a: DecodeBatch | None, b: DecodeBatch | None) -> DecodeBatch | None:
        """Rows of `a` then rows of `b`; the narrower batch is left-padded with masked columns."""
        if a is None or b is None:
            return a or b
        S = max(a.width, b.width)
        pairs = list(zip(a.kv.cache.layers, b.kv.cache.layers, strict=True))
        cache = cache_from(
            [torch.cat([pad_columns(la.keys, S, 2), pad_columns(lb.keys, S, 2)]) for la, lb in pairs],
            [torch.cat([pad_columns(la.values, S, 2), pad_columns(lb.values, S, 2)]) for la, lb in pairs],
        )
        mask = torch.cat([pad_columns(a.kv.mask, S, 1), pad_columns(b.kv.mask, S, 1)])
        kv = KVState(cache, mask, torch.cat([a.kv.next_pos, b.kv.next_pos]))
        return DecodeBatch(a.rows + b.rows, kv, torch.cat([a.tokens, b.tokens]))
