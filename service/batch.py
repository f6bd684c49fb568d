"""The running decode batch: its key/value cache, key mask and next positions, one record per row.

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

from .prefix_kv import compaction_index, pad_columns


def cache_from(keys: list[torch.Tensor], values: list[torch.Tensor]) -> DynamicCache:
    """A DynamicCache holding the given per-layer (B, H_kv, S, D) tensors without copying them."""
    cache = DynamicCache()
    for k, v in zip(keys, values, strict=True):
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache


@dataclass
class DecodeBatch:
    """Args:
    rows: per-row payload (the engine's request state); row i of every tensor belongs to rows[i].
    cache: per layer keys/values (B, H_kv, S, D), mutated in place by each decode forward.
    mask: (B, S) bool, True for real key columns.
    next_pos: (B,) long, the position id of the next token each row feeds.
    """

    rows: list[Any]
    cache: DynamicCache
    mask: torch.Tensor
    next_pos: torch.Tensor

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def append_step(self) -> None:
        """After a decode forward appended one key column to every row: record it and advance positions."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        self.next_pos = self.next_pos + 1

    def filter(self, keep: list[int]) -> DecodeBatch | None:
        """The batch restricted to rows `keep` (in that order), or None when no row is left."""
        if not keep:
            return None
        if keep == list(range(len(self))):
            return self
        idx = torch.tensor(keep, device=self.mask.device)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[idx], layer.values[idx]
        out = DecodeBatch([self.rows[i] for i in keep], self.cache, self.mask[idx], self.next_pos[idx])
        out.compact()
        return out

    def compact(self, max_waste: float = 0.5) -> None:
        """Right-aligns each row's real keys when more than `max_waste` of the columns are masked, so attention
        cost follows the longest live row rather than the history of rows that have left."""
        real = int(self.mask.sum(1).max())
        if real >= self.width * (1 - max_waste):
            return
        idx = compaction_index(self.mask)  # (B, S')
        gather = idx[:, None, :, None]
        for layer in self.cache.layers:
            shape = (-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys = torch.gather(layer.keys, 2, gather.expand(*shape))
            layer.values = torch.gather(layer.values, 2, gather.expand(*shape))
        self.mask = torch.gather(self.mask, 1, idx)

    @staticmethod
    def concatenate(a: DecodeBatch | None, b: DecodeBatch | None) -> DecodeBatch | None:
        """Rows of `a` then rows of `b`; the narrower batch is left-padded with masked columns."""
        if a is None or b is None:
            return a or b
        S = max(a.width, b.width)
        for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
            la.keys = torch.cat([pad_columns(la.keys, S, 2), pad_columns(lb.keys, S, 2)])
            la.values = torch.cat([pad_columns(la.values, S, 2), pad_columns(lb.values, S, 2)])
        mask = torch.cat([pad_columns(a.mask, S, 1), pad_columns(b.mask, S, 1)])
        return DecodeBatch(a.rows + b.rows, a.cache, mask, torch.cat([a.next_pos, b.next_pos]))
