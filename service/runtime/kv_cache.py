"""Device memory for key/values: every resident prefix once, in a paged pool; every running row's own tokens in a
preallocated slot.

Letters: L layers, H_kv key/value heads, D head dim, P a prefix's virtual tokens, R row slots.

PrefixPool: one tensor (L, 2, N, H_kv, D) of N prefix-token positions, handed out in blocks of BLOCK tokens, so
prefixes of any length share it without fragmentation. A prefix is the list of its positions; rows of a task read
their task's positions (a gather per layer into the attention, never a stored per-row copy). It grows by doubling
up to its byte budget.

SlotCache: keys and values of R slots, in segments of positions; a row owns one slot for its life, its tokens written
in place at positions 0..n-1. Nothing is copied when rows join; a row leaving moves at most one other row into its
slot (see RunningBatch); widening adds a segment and copies nothing.
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
        self._heads = torch.arange(self.H, device=device)

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

    def gather(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of layer `layer` at positions `index` (B, Pmax): each (B, H_kv, Pmax, D), contiguous.

        One index_select per tensor over the layer viewed as (N * H_kv, D) rows, with the row index laid out
        (b, h, p), so the result needs no transpose (a transposed gather would be copied again by the matmuls)."""
        B, Pmax = index.shape
        rows = (index[:, None, :] * self.H + self._heads[:, None]).reshape(-1)  # (B * H_kv * Pmax,)
        k = self.data[layer, 0].view(-1, self.D).index_select(0, rows).view(B, self.H, Pmax, self.D)
        v = self.data[layer, 1].view(-1, self.D).index_select(0, rows).view(B, self.H, Pmax, self.D)
        return k, v

    def _grow(self) -> None:
        old = self.capacity_blocks
        new = min(self.max_blocks, max(4, 2 * old))
        data = torch.zeros(self.L, 2, new * BLOCK, self.H, self.D, dtype=self.dtype, device=self.device)
        data[:, :, : old * BLOCK] = self.data
        self.data = data
        self._free += list(range(old, new))


class SlotCache:
    """Token key/values of running rows, one slot per row, in segments of positions.

    Segment i holds positions [start_i, start_i + width_i) of every slot: (L, R, H_kv, width_i, D) keys and the same
    for values. A segment is added when a row needs more positions, sized to the need (at least half the current
    width, so a growing workload adds few segments), and trailing segments are dropped when no row has needed them
    for a while (see Engine). So memory follows the longest live row, and widening never copies what is already
    there. New segments are zeros: attention masks the positions past a row's length, and zeros keep them finite.

    Args:
        fp: the backbone geometry.
        rows: slots (the most rows running at once).
        max_width: the most positions a slot may hold (the context window).
    """

    def __init__(
        self, fp: BackboneFingerprint, *, rows: int, max_width: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.L, self.H, self.D = fp.num_layers, fp.num_kv_heads, fp.head_dim
        self.rows, self.max_width = rows, max_width
        self.dtype, self.device = dtype, device
        self.k: list[torch.Tensor] = []  # segments, each (L, R, H_kv, width_i, D)
        self.v: list[torch.Tensor] = []
        self.starts: list[int] = []  # first position of each segment

    @property
    def width(self) -> int:
        return self.starts[-1] + self.k[-1].shape[3] if self.k else 0

    @property
    def nbytes(self) -> int:
        return sum(2 * t.numel() * t.element_size() for t in self.k)

    def ensure_width(self, needed: int) -> None:
        """Adds a segment so that every slot holds `needed` positions."""
        if needed <= self.width:
            return
        width = -(-max(needed - self.width, self.width // 2) // 16) * 16
        shape = (self.L, self.rows, self.H, width, self.D)
        self.starts.append(self.width)
        self.k.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
        self.v.append(torch.zeros(shape, dtype=self.dtype, device=self.device))

    def shrink(self, needed: int) -> None:
        """Drops the trailing segments that start at or past `needed` positions."""
        while self.starts and self.starts[-1] >= needed:
            self.starts.pop()
            self.k.pop()
            self.v.pop()

    def _segments(self, end: int) -> list[tuple[int, int, int]]:
        """(segment, first position, width used) of the segments covering positions 0..end-1."""
        out = []
        for i, start in enumerate(self.starts):
            if start >= end:
                break
            out.append((i, start, min(self.k[i].shape[3], end - start)))
        return out

    def _locate(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment number and offset in it of positions `pos`."""
        starts = torch.tensor(self.starts, device=pos.device)
        seg = torch.searchsorted(starts, pos, right=True) - 1
        return seg, pos - starts[seg]

    def write(self, layer: int, slots: torch.Tensor, past: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes a forward's token keys/values (B, H_kv, T, D) at positions past..past+T-1 of each row's slot.
        Padding positions are written too: they lie beyond the row's length, where attention never looks."""
        T = k.shape[2]
        pos = past[:, None] + torch.arange(T, device=k.device)[None]  # (B, T)
        rows = slots[:, None].expand(-1, T)
        seg, off = self._locate(pos)
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # (B, T, H_kv, D)
        for i in range(int(seg.min()), int(seg.max()) + 1):
            sel = seg == i  # (B, T)
            self.k[i][layer][rows[sel], :, off[sel]] = kt[sel]
            self.v[i][layer][rows[sel], :, off[sel]] = vt[sel]

    def write_decode(self, layer: int, B: int, past: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """The decode case of `write`: rows are slots 0..B-1, one token each (B, H_kv, 1, D)."""
        rows = torch.arange(B, device=k.device)
        seg, off = self._locate(past)
        lo, hi = int(seg.min()), int(seg.max())
        if lo == hi:  # the usual case: every row's next position in one segment
            self.k[lo][layer][rows, :, off] = k[:, :, 0]
            self.v[lo][layer][rows, :, off] = v[:, :, 0]
            return
        for i in range(lo, hi + 1):
            sel = seg == i
            self.k[i][layer][rows[sel], :, off[sel]] = k[sel, :, 0]
            self.v[i][layer][rows[sel], :, off[sel]] = v[sel, :, 0]

    def decode_parts(self, layer: int, B: int, S: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Views (no copy) of rows 0..B-1, positions 0..S-1, one (keys, values) pair per segment, each
        (B, H_kv, width, D)."""
        return [(self.k[i][layer][:B, :, :w], self.v[i][layer][:B, :, :w]) for i, _, w in self._segments(S)]

    def gather(self, layer: int, slots: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H_kv, S, D) of the given slots' positions 0..S-1 (a copy)."""
        segs = self._segments(S)
        k = torch.cat([self.k[i][layer][slots, :, :w] for i, _, w in segs], 2)
        v = torch.cat([self.v[i][layer][slots, :, :w] for i, _, w in segs], 2)
        return k, v

    def swap(self, a: int, b: int, len_a: int, len_b: int) -> None:
        """Exchanges the tokens of slots a and b (every layer)."""
        for i, _, _ in self._segments(max(len_a, len_b)):
            for buf in (self.k[i], self.v[i]):
                buf[:, [a, b]] = buf[:, [b, a]]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copies one row's first `length` tokens from slot `src` to slot `dst` (every layer)."""
        for i, _, w in self._segments(length):
            self.k[i][:, dst, :, :w] = self.k[i][:, src, :, :w]
            self.v[i][:, dst, :, :w] = self.v[i][:, src, :, :w]
