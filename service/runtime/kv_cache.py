"""Device memory for key/values: every resident prefix once, in a paged pool; every running row's own tokens in a
preallocated slot.

Letters: L layers, H_kv key/value heads, D head dim, P a prefix's virtual tokens, R row slots, W slot width (tokens).

PrefixPool: one tensor (L, 2, N, H_kv, D) of N prefix-token positions, handed out in blocks of BLOCK tokens, so
prefixes of any length share it without fragmentation. A prefix is the list of its positions; rows of a task read
their task's positions (a gather per layer into the attention, never a stored per-row copy). It grows by doubling
up to its byte budget.

SlotCache: (L, R, H_kv, W, D) keys and values; a row owns one slot for its life, its tokens written in place at
positions 0..n-1. Nothing is copied when rows join; a row leaving moves at most one other row into its slot (see
RunningBatch). W grows by doubling (a rare whole-cache copy) up to the context window.
"""

from __future__ import annotations

import torch

from prefix_store import BackboneFingerprint

BLOCK = 4  # prefix tokens per pool block: small, so short prefixes waste little


class PrefixPool:
    """Args:
    fp: the backbone geometry (L, H_kv, D).
    max_bytes: the pool may grow to this many bytes.
    """

    def __init__(self, fp: BackboneFingerprint, *, dtype: torch.dtype, device: torch.device, max_bytes: int) -> None:
        self.L, self.H, self.D = fp.num_layers, fp.num_kv_heads, fp.head_dim
        self.dtype, self.device = dtype, device
        self.token_bytes = 2 * self.L * self.H * self.D * torch.empty((), dtype=dtype).element_size()
        self.max_blocks = max(1, max_bytes // (self.token_bytes * BLOCK))
        self.data = torch.zeros(self.L, 2, 0, self.H, self.D, dtype=dtype, device=device)  # (L, 2, N, H_kv, D)
        self._free: list[int] = []  # free block numbers
        self._arange = torch.arange(BLOCK, device=device)

    @property
    def capacity_blocks(self) -> int:
        return self.data.shape[2] // BLOCK

    @property
    def free_blocks(self) -> int:
        return len(self._free) + (self.max_blocks - self.capacity_blocks)

    @property
    def used_bytes(self) -> int:
        return (self.capacity_blocks - len(self._free)) * BLOCK * self.token_bytes

    @staticmethod
    def blocks_for(P: int) -> int:
        return -(-P // BLOCK)

    def alloc(self, P: int) -> torch.Tensor | None:
        """Positions (P,) long for a prefix of P tokens, or None when the pool is full (the caller evicts)."""
        n = self.blocks_for(P)
        if n > self.free_blocks:
            return None
        while len(self._free) < n:
            self._grow()
        blocks, self._free = self._free[:n], self._free[n:]
        index = (torch.tensor(blocks, device=self.device)[:, None] * BLOCK + self._arange[None]).reshape(-1)
        return index[:P]

    def release(self, index: torch.Tensor) -> None:
        self._free += sorted(set((index // BLOCK).tolist()))

    def write(self, index: torch.Tensor, kv: torch.Tensor) -> None:
        """kv (L, 2, H_kv, P, D) into the positions `index` (P,)."""
        self.data[:, :, index] = kv.to(self.dtype).permute(0, 1, 3, 2, 4)

    def gather(self, layer: int, index: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Keys and values of layer `layer` at positions `index` (B, Pmax): each (B, H_kv, Pmax, D)."""
        B, Pmax = index.shape
        flat = index.reshape(-1)
        k = self.data[layer, 0].index_select(0, flat).view(B, Pmax, self.H, self.D).transpose(1, 2)
        v = self.data[layer, 1].index_select(0, flat).view(B, Pmax, self.H, self.D).transpose(1, 2)
        return k, v

    def _grow(self) -> None:
        old = self.capacity_blocks
        new = min(self.max_blocks, max(4, 2 * old))
        data = torch.zeros(self.L, 2, new * BLOCK, self.H, self.D, dtype=self.dtype, device=self.device)
        data[:, :, : old * BLOCK] = self.data
        self.data = data
        self._free += list(range(old, new))


class SlotCache:
    """Args:
    fp: the backbone geometry.
    rows: slots (the most rows running at once).
    max_width: the widest a slot may grow (the context window).
    """

    def __init__(
        self, fp: BackboneFingerprint, *, rows: int, max_width: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.L, self.H, self.D = fp.num_layers, fp.num_kv_heads, fp.head_dim
        self.rows, self.max_width = rows, max_width
        self.dtype, self.device = dtype, device
        self.k = torch.zeros(self.L, rows, self.H, 0, self.D, dtype=dtype, device=device)  # (L, R, H_kv, W, D)
        self.v = torch.zeros_like(self.k)

    @property
    def width(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def ensure_width(self, needed: int) -> None:
        """Grows every slot to hold `needed` tokens (doubling, capped at max_width)."""
        if needed <= self.width:
            return
        width = min(max(needed, 2 * self.width, 64), max(self.max_width, needed))
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros(self.L, self.rows, self.H, width, self.D, dtype=self.dtype, device=self.device)
            new[:, :, :, : old.shape[3]] = old
            setattr(self, name, new)

    def write(self, layer: int, slots: torch.Tensor, past: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes a forward's token keys/values (B, H_kv, T, D) at positions past..past+T-1 of each row's slot.
        Padding positions are written too: they lie beyond the row's length, where attention never looks."""
        T = k.shape[2]
        if not bool(past.any()):  # every row starts at position 0: one indexed copy along the slot dimension
            self.k[layer][slots, :, :T] = k
            self.v[layer][slots, :, :T] = v
            return
        pos = past[:, None] + torch.arange(T, device=k.device)[None]  # (B, T)
        rows = slots[:, None].expand(-1, T)  # (B, T)
        self.k[layer][rows, :, pos] = k.transpose(1, 2)  # (B, T, H_kv, D) into advanced-indexed (B, T) positions
        self.v[layer][rows, :, pos] = v.transpose(1, 2)

    def write_decode(self, layer: int, B: int, past: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """The decode case of `write`: rows are slots 0..B-1, one token each (B, H_kv, 1, D)."""
        rows = torch.arange(B, device=k.device)
        self.k[layer][rows, :, past] = k[:, :, 0]
        self.v[layer][rows, :, past] = v[:, :, 0]

    def swap(self, a: int, b: int, len_a: int, len_b: int) -> None:
        """Exchanges the tokens of slots a and b (every layer)."""
        n = max(len_a, len_b)
        for buf in (self.k, self.v):
            buf[:, [a, b], :, :n] = buf[:, [b, a], :, :n]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copies one row's first `length` tokens from slot `src` to slot `dst` (every layer)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
