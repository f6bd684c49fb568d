"""Device memory for key/values: every resident prefix once, in a paged pool; every running row's own tokens in a
preallocated slot.

Letters: L layers, H_kv key/value heads, D head dim, P a prefix's virtual tokens, R row slots.

PrefixPool: one tensor (L, 2, N, H_kv, D) of N prefix-token positions, handed out in blocks of BLOCK tokens, so
prefixes of any length share it without fragmentation. A prefix is the list of its positions; rows of a task read
their task's positions (a gather per layer into the attention, never a stored per-row copy). It grows by doubling
up to its byte budget.

SlotCache: keys and values of R slots; a row owns one slot for its life, its tokens written in place at positions
0..n-1 (full layers, in segments of positions) or at t mod C (sliding-window layers, in a ring of at most the window).
Nothing is copied when rows join; a row leaving moves at most one other row into its slot (see RunningBatch);
widening adds a segment and copies nothing.
"""

from __future__ import annotations

import torch

from prefix_store import BackboneFingerprint

BLOCK = 4  # prefix tokens per pool block: small, so short prefixes waste little
MIN_POW2_WIDTH = 64  # a pow2 SlotCache's first segment (compiled.py's smallest slot-width bucket)


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

    @property
    def max_bytes(self) -> int:
        """The budget the pool may grow to, in whole blocks."""
        return self.max_blocks * BLOCK * self.token_bytes

    @staticmethod
    def blocks_for(P: int) -> int:
        return -(-P // BLOCK)

    def bytes_for(self, P: int) -> int:
        """Pool bytes a prefix of P tokens holds (whole blocks)."""
        return self.blocks_for(P) * BLOCK * self.token_bytes

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

    def reserve(self) -> None:
        """Grows the pool to its whole budget now, so its shape never changes again: a compiled step's graphs
        specialise on it (compiled.py)."""
        while self.capacity_blocks < self.max_blocks:
            self._grow()

    def _grow(self) -> None:
        old = self.capacity_blocks
        new = min(self.max_blocks, max(4, 2 * old))
        data = torch.zeros(self.L, 2, new * BLOCK, self.H, self.D, dtype=self.dtype, device=self.device)
        data[:, :, : old * BLOCK] = self.data
        self.data = data
        self._free += list(range(old, new))


class SlotCache:
    """Token key/values of running rows, one slot per row.

    Layers that attend to every earlier token ("full" layers) keep all of a row's tokens, in segments of positions:
    segment i holds positions [start_i, start_i + width_i) of every slot, (L_full, R, H_kv, width_i, D) keys and the
    same for values. A segment is added when a row needs more positions, sized to the need (at least half the
    current width, so a growing workload adds few segments), and trailing segments are dropped when no row has needed
    them for a while (see Engine). So memory follows the longest live row, and widening never copies what is already
    there. New segments are zeros: attention masks the positions past a row's length, and zeros keep them finite.

    Sliding-window layers keep only their window (the memory is the point of a window): per window size W a ring of
    C = min(W, width) positions per slot, (L_W, R, H_kv, C, D), token t of a row at ring position t mod C. A token at
    position q attends to q-W+1..q, so W positions are all a row ever needs; prefill attends to the ring before
    writing a chunk into it. While C < W no row has more than C tokens (rings grow with the width, before any row
    needs more), so growing or shrinking a ring keeps positions 0..C-1 where they are.

    Args:
        fp: the backbone geometry.
        rows: slots (the most rows running at once).
        max_width: the most positions a slot may hold (the context window).
        windows: per layer, its sliding window or None (families.attention_windows); default: none slides.
        pow2: the width grows to powers of two (at least MIN_POW2_WIDTH, at most max_width), so segments end on the
            slot-width buckets of a compiled step (compiled.py) and a bucket never ends inside a segment it does not
            fill; otherwise by at least half the width (fewer segments for eager steps).
        scratch: full layers' segments get one more slot, `rows` (no row ever owns it), where a compiled step's
            padding rows write: a plain indexed write, where a masked read-modify-write of the real slots would
            make the compiled graph copy whole segments.
    """

    def __init__(
        self,
        fp: BackboneFingerprint,
        *,
        rows: int,
        max_width: int,
        dtype: torch.dtype,
        device: torch.device,
        windows: tuple[int | None, ...] | None = None,
        pow2: bool = False,
        scratch: bool = False,
    ) -> None:
        self.L, self.H, self.D = fp.num_layers, fp.num_kv_heads, fp.head_dim
        self.rows, self.max_width, self.pow2 = rows, max_width, pow2
        self.scratch: int | None = rows if scratch else None  # the scratch slot, if any
        self.dtype, self.device = dtype, device
        windows = windows or (None,) * self.L
        # A window that covers every position a slot can hold changes nothing: such a layer keeps every token.
        self.windows = tuple(None if w is None or w >= max_width else w for w in windows)
        self.full_layers = [i for i, w in enumerate(self.windows) if w is None]
        self._index = {layer: i for i, layer in enumerate(self.full_layers)}  # layer -> its index in a segment
        self.rings: dict[int, _Ring] = {}  # window -> the ring of every layer with that window
        for W in sorted({w for w in self.windows if w is not None}):
            layers = [i for i, w in enumerate(self.windows) if w == W]
            self.rings[W] = _Ring(W, len(layers), rows, self.H, self.D, dtype=dtype, device=device)
            self._index |= {layer: i for i, layer in enumerate(layers)}
        self.k: list[torch.Tensor] = []  # segments, each (L_full, R, H_kv, width_i, D)
        self.v: list[torch.Tensor] = []
        self.starts: list[int] = []  # first position of each segment

    @property
    def width(self) -> int:
        return self.starts[-1] + self.k[-1].shape[3] if self.k else 0

    @property
    def nbytes(self) -> int:
        rings = sum(r.nbytes for r in self.rings.values())
        return sum(2 * t.numel() * t.element_size() for t in self.k) + rings

    def window(self, layer: int) -> int | None:
        """The layer's sliding window when it keeps a ring, else None (it keeps every token)."""
        return self.windows[layer]

    def ring(self, layer: int) -> _Ring:
        W = self.windows[layer]
        assert W is not None, f"layer {layer} keeps every token"
        return self.rings[W]

    def ensure_width(self, needed: int) -> None:
        """Adds segments so that every slot holds `needed` positions (rings: their window, at most)."""
        if needed > self.width and self.pow2:
            target = min(self.max_width, max(MIN_POW2_WIDTH, 1 << (needed - 1).bit_length()))
            # One doubling at a time, so the segments depend on the width alone: a compiled graph, keyed by the
            # width it reads, bakes the segments' bounds in, and must meet the same ones after a shrink and regrow.
            while self.width < target:
                self._add_segment(min(max(self.width, MIN_POW2_WIDTH), target - self.width))
        elif needed > self.width:
            self._add_segment(-(-max(needed - self.width, self.width // 2) // 16) * 16)
        for ring in self.rings.values():
            ring.resize(min(ring.window, self.width))

    def _add_segment(self, width: int) -> None:
        shape = (len(self.full_layers), self.rows + (self.scratch is not None), self.H, width, self.D)
        self.starts.append(self.width)
        self.k.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
        self.v.append(torch.zeros(shape, dtype=self.dtype, device=self.device))

    def shrink(self, needed: int) -> None:
        """Drops the trailing segments that start at or past `needed` positions (rings follow the width)."""
        while self.starts and self.starts[-1] >= needed:
            self.starts.pop()
            self.k.pop()
            self.v.pop()
        for ring in self.rings.values():
            ring.resize(min(ring.window, self.width))

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

    # -- full layers ----------------------------------------------------------------------------------------------
    def write(self, layer: int, slots: torch.Tensor, past: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes a forward's token keys/values (B, H_kv, T, D) at positions past..past+T-1 of each row's slot.
        Padding positions are written too: they lie beyond the row's length, where attention never looks."""
        T, li = k.shape[2], self._index[layer]
        pos = past[:, None] + torch.arange(T, device=k.device)[None]  # (B, T)
        rows = slots[:, None].expand(-1, T)
        seg, off = self._locate(pos)
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # (B, T, H_kv, D)
        for i in range(int(seg.min()), int(seg.max()) + 1):
            sel = seg == i  # (B, T)
            self.k[i][li][rows[sel], :, off[sel]] = kt[sel]
            self.v[i][li][rows[sel], :, off[sel]] = vt[sel]

    def write_decode(self, layer: int, B: int, past: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """The decode case of `write`: rows are slots 0..B-1, one token each (B, H_kv, 1, D)."""
        rows, li = torch.arange(B, device=k.device), self._index[layer]
        seg, off = self._locate(past)
        lo, hi = int(seg.min()), int(seg.max())
        if lo == hi:  # the usual case: every row's next position in one segment
            self.k[lo][li][rows, :, off] = k[:, :, 0]
            self.v[lo][li][rows, :, off] = v[:, :, 0]
            return
        for i in range(lo, hi + 1):
            sel = seg == i
            self.k[i][li][rows[sel], :, off[sel]] = k[sel, :, 0]
            self.v[i][li][rows[sel], :, off[sel]] = v[sel, :, 0]

    def decode_parts(self, layer: int, B: int, S: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Views (no copy) of rows 0..B-1, positions 0..S-1, one (keys, values) pair per segment, each
        (B, H_kv, width, D)."""
        li = self._index[layer]
        return [(self.k[i][li][:B, :, :w], self.v[i][li][:B, :, :w]) for i, _, w in self._segments(S)]

    def gather(self, layer: int, slots: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H_kv, S, D) of the given slots' positions 0..S-1 (a copy)."""
        segs, li = self._segments(S), self._index[layer]
        k = torch.cat([self.k[i][li][slots, :, :w] for i, _, w in segs], 2)
        v = torch.cat([self.v[i][li][slots, :, :w] for i, _, w in segs], 2)
        return k, v

    # -- sliding-window layers ----------------------------------------------------------------------------------
    def ring_write(
        self, layer: int, slots: torch.Tensor, past: torch.Tensor, new: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Writes each row's real tokens of a forward (B, H_kv, T, D), tokens past..past+new-1, into its ring: the
        last C of them (padding is never written: it would land on a position the window still needs)."""
        ring, li = self.ring(layer), self._index[layer]
        C, T = ring.capacity, k.shape[2]
        j = torch.arange(T, device=k.device)[None]  # (1, T)
        t = past[:, None] + j  # (B, T) token index
        sel = (j < new[:, None]) & (t >= (past + new)[:, None] - C)  # (B, T): real, and among the last C
        rows = slots[:, None].expand(-1, T)
        ring.k[li][rows[sel], :, t[sel] % C] = k.transpose(1, 2)[sel]
        ring.v[li][rows[sel], :, t[sel] % C] = v.transpose(1, 2)[sel]

    def ring_write_decode(self, layer: int, B: int, past: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Decode: slots 0..B-1 each gain token `past` (B,), keys/values (B, H_kv, 1, D)."""
        ring, li = self.ring(layer), self._index[layer]
        rows, pos = torch.arange(B, device=k.device), past % ring.capacity
        ring.k[li][rows, :, pos] = k[:, :, 0]
        ring.v[li][rows, :, pos] = v[:, :, 0]

    def ring_view(self, layer: int, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rings of slots 0..B-1, (B, H_kv, C, D) keys and values, views (no copy)."""
        ring, li = self.ring(layer), self._index[layer]
        return ring.k[li][:B], ring.v[li][:B]

    def ring_gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rings of the given slots, (B, H_kv, C, D) keys and values (a copy)."""
        ring, li = self.ring(layer), self._index[layer]
        return ring.k[li][slots], ring.v[li][slots]

    # -- moving rows ----------------------------------------------------------------------------------------------
    def swap(self, a: int, b: int, len_a: int, len_b: int) -> None:
        """Exchanges the tokens of slots a and b (every layer)."""
        for i, _, _ in self._segments(max(len_a, len_b)):
            for buf in (self.k[i], self.v[i]):
                buf[:, [a, b]] = buf[:, [b, a]]
        for ring in self.rings.values():
            n = min(max(len_a, len_b), ring.capacity)
            for buf in (ring.k, ring.v):
                buf[:, [a, b], :, :n] = buf[:, [b, a], :, :n]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copies one row's first `length` tokens from slot `src` to slot `dst` (every layer)."""
        for i, _, w in self._segments(length):
            self.k[i][:, dst, :, :w] = self.k[i][:, src, :, :w]
            self.v[i][:, dst, :, :w] = self.v[i][:, src, :, :w]
        for ring in self.rings.values():
            n = min(length, ring.capacity)
            ring.k[:, dst, :, :n] = ring.k[:, src, :, :n]
            ring.v[:, dst, :, :n] = ring.v[:, src, :, :n]


class _Ring:
    """The ring of every layer with one sliding window W: keys and values (L_W, R, H_kv, C, D), C <= W."""

    def __init__(
        self, window: int, layers: int, rows: int, H: int, D: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.window, self.layers = window, layers
        self._shape = (rows, H, D)
        self.dtype, self.device = dtype, device
        self.k = self.v = torch.zeros(layers, rows, H, 0, D, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def resize(self, capacity: int) -> None:
        """Positions 0..min(old, new)-1 are kept where they are (see SlotCache)."""
        old = self.capacity
        if capacity == old:
            return
        R, H, D = self._shape
        k = torch.zeros(self.layers, R, H, capacity, D, dtype=self.dtype, device=self.device)
        v = torch.zeros_like(k)
        n = min(old, capacity)
        k[..., :n, :], v[..., :n, :] = self.k[..., :n, :], self.v[..., :n, :]
        self.k, self.v = k, v
