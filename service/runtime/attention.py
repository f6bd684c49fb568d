"""The attention of a mixed-prefix batch, registered with transformers' AttentionInterface so that the backbone's own
attention modules call it per layer (their projections, rotary embeddings, norms and output layers are untouched).

Each row attends over its task's prefix (read from the PrefixPool, stored once per task) and its own tokens (in its
SlotCache slot, or the forward's own tokens for an encoder). Sequence positions: a row's prefix occupies 0..P-1 and
its token t sits at P + t, as PEFT's cache lays them out; rotary or learned positions P + t were applied to the
tokens' keys by the model before this function sees them, and prefix keys carry none. Rows of different tasks and
prefix lengths share one forward because every mask is built from these per-row positions:

- causal: key position <= query position (decoders); encoders attend both ways.
- sliding window W (a layer's `sliding_window`): key position > query position - W, prefix positions included, as
  transformers' sliding-window mask treats the prefix PEFT hands it in the cache. Such a layer keeps only its window
  of tokens, in a ring (kv_cache.SlotCache).
- attention soft-cap c (`softcap`, Gemma 2): scores -> c * tanh(scores / c) before masking.
- attention sinks (`s_aux`, gpt-oss): one learned logit per head joins each softmax's denominator.
- the module's own `scaling` (Gemma's `query_pre_attn_scalar`, OPT's 1.0 after pre-scaled queries).

Modes: decode (one new token per row, rows in slots 0..B-1: the scores of every key set are computed against the
cache in place and joined before one softmax, so nothing of the cache is copied); prefill (T new tokens per row,
right-padded; a later chunk of a long prompt sees the earlier ones in its slot); encode (bidirectional, no cache).

The engine's per-forward state reaches this function through a context variable set by `serving`, not through the
model's keyword arguments, so families whose layers do not forward `**kwargs` (StableLM) are served all the same;
`serving` also checks that every layer's attention ran exactly once, and any attention argument this function does
not implement is refused, so a family that bypasses or extends the engine's attention fails loudly, never silently.
The runner switches the model to this implementation only for its own forwards, so the same model keeps
transformers' own attention for anything else (the trainer's forward, soft-prompt materialisation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F
from transformers import AttentionInterface

from .families import HARMLESS_ARGS, HONOURED_ARGS
from .kv_cache import PrefixPool, SlotCache

ATTN_NAME = "prefix_serve"
NEG_INF = float("-inf")
# Decode's prefix attention grouped by task (TaskGroups): None chooses per step (TaskGroups.pays), True or False
# forces it for every step (the tests run the engine both ways and compare).
CASCADE: bool | None = None


class AttentionBypassed(RuntimeError):
    """The backbone's layers did not run the engine's attention as it must (a layer skipped it, ran it twice, or
    asked for something it does not implement): the forward's output cannot be trusted."""


@dataclass(frozen=True)
class Features:
    """What one attention call asks beyond softmax(q k^T * scale) over the keys the masks allow.

    window: sliding window W or None; softcap: c or None; sinks: (H,) one logit per query head, or None."""

    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None


def call_features(module: Any, attention_mask: Any, kwargs: dict[str, Any]) -> Features:
    """The features of one call, from the arguments the module passed; anything this attention does not implement
    is refused (AttentionBypassed), naming it."""
    if attention_mask is not None:
        raise AttentionBypassed(
            f"{type(module).__name__} passed its own attention mask: the engine builds every mask itself"
        )
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in HARMLESS_ARGS | HONOURED_ARGS)
    if unknown:
        raise AttentionBypassed(
            f"{type(module).__name__} asks for attention arguments the engine does not implement: {unknown}"
        )
    if kwargs.get("dropout"):
        raise AttentionBypassed(f"{type(module).__name__} asks for attention dropout {kwargs['dropout']} (training?)")
    if kwargs.get("is_causal") is False:
        raise AttentionBypassed(f"{type(module).__name__} asks for bidirectional attention in a causal model")
    window = kwargs.get("sliding_window")
    return Features(int(window) if window else None, kwargs.get("softcap") or None, kwargs.get("s_aux"))


@dataclass
class ForwardState:
    """What every layer's attention needs for one forward of the runner; masks are built once per key layout and
    window, on first use, and shared by the layers.

    Args:
        mode: "decode", "prefill" or "encode" (see the module doc).
        pool: the prefix pool.
        prefix_index: (B, Pmax) long, each row's prefix positions in the pool (padding entries are masked).
        prefix_len: (B,) long, each row's prefix length P (0: no prefix).
        new: (B,) long, real tokens each row feeds in this forward (the rest of T is right padding).
        cache: the slot cache (decode, prefill).
        slots: (B,) long, each row's slot (prefill; in decode rows are slots 0..B-1).
        past: (B,) long, tokens already in each row's slot before this forward.
        layers: the backbone's attention layers (each must run once).
    """

    mode: str
    pool: PrefixPool
    prefix_index: torch.Tensor
    prefix_len: torch.Tensor
    new: torch.Tensor
    cache: SlotCache | None = None
    slots: torch.Tensor | None = None
    past: torch.Tensor | None = None
    layers: int = 0
    # decode: each row's prefix as the host knows it (equal for rows of one task version, None without one), so
    # grouping rows by task reads nothing back from the device; None: read from prefix_index.
    task_names: Sequence[Hashable] | None = None
    calls: list[int] = field(default_factory=list, repr=False)
    _masks: dict[Any, Mask] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.first_chunk = self.past is not None and not bool(self.past.any())
        self.calls = [0] * self.layers
        self.groups: TaskGroups | None = None
        cascade, Pmax = CASCADE, self.prefix_index.shape[1]
        if self.mode == "decode" and Pmax and (cascade or (cascade is None and Pmax >= TaskGroups.MIN_PREFIX)):
            groups = TaskGroups.of(self.prefix_index, self.prefix_len, self.task_names)
            if cascade or groups.pays(Pmax):
                self.groups = groups

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, f: Features
    ) -> torch.Tensor:
        """q (B, H, T, D), this forward's k, v (B, H_kv, T, D) -> attention output (B, T, H, D)."""
        if not 0 <= layer < self.layers:
            raise AttentionBypassed(f"attention called for layer {layer}: the backbone has {self.layers} layers")
        self.calls[layer] += 1
        # (B, H_kv, Pmax, D) each: every row's prefix; grouped by task: (G, H_kv, Pmax, D), each prefix read once
        prefix = self.pool.gather(layer, self.prefix_index if self.groups is None else self.groups.index)
        T = q.shape[2]
        if self.mode == "encode":
            keep = self._mask(("encode", None), T, lambda: self._encode_keys(T), causal=False, window=None)
            return _attention(q, [prefix, (k, v)], keep, scale, f, sdpa=True)
        cache, past = self.cache, self.past
        assert cache is not None and past is not None
        ring = cache.window(layer)
        if ring is not None and f.window != ring:
            raise AttentionBypassed(
                f"layer {layer} keeps a window of {ring} tokens but its attention asks for sliding_window={f.window}"
            )
        B = q.shape[0]
        if self.mode == "decode":
            if ring is None:
                cache.write_decode(layer, B, past, k, v)
                S = int(past.max()) + 1
                keys = [prefix, *cache.decode_parts(layer, B, S)]
                layout = lambda: self._token_keys(S)  # noqa: E731
            else:
                cache.ring_write_decode(layer, B, past, k, v)
                keys = [prefix, cache.ring_view(layer, B)]
                layout = lambda: self._ring_keys(cache.ring(layer).capacity, last=past)  # noqa: E731
            keep = self._mask(("decode", ring, f.window), 1, layout, causal=True, window=f.window)
            return _manual(q, keys, keep, scale, f, self.groups)
        assert self.slots is not None
        if ring is None:
            cache.write(layer, self.slots, past, k, v)
            if self.first_chunk:  # no earlier tokens in any slot: the keys are this forward's own
                S, own = T, (k, v)
            else:
                S = int((past + T).max())
                own = cache.gather(layer, self.slots, S)  # (B, H_kv, S, D): the prefilling rows' slots
            keep = self._mask(("prefill", None, f.window), T, lambda: self._token_keys(S), True, f.window)
            return _attention(q, [prefix, own], keep, scale, f, sdpa=True)
        keys = [prefix] if self.first_chunk else [prefix, cache.ring_gather(layer, self.slots)]
        C = cache.ring(layer).capacity

        def ring_layout() -> tuple[torch.Tensor, torch.Tensor]:
            seq, valid = self._chunk_keys(T)
            if not self.first_chunk:
                rseq, rvalid = self._ring_keys(C, last=past - 1)
                seq, valid = torch.cat([rseq, seq], 1), torch.cat([rvalid, valid], 1)
            return seq, valid

        keep = self._mask(("prefill-ring", ring, f.window), T, ring_layout, causal=True, window=f.window)
        out = _attention(q, [*keys, (k, v)], keep, scale, f, sdpa=True)
        cache.ring_write(layer, self.slots, past, self.new, k, v)  # after attending: the chunk's own keys were used
        return out

    def check_complete(self) -> None:
        """Every layer's attention ran exactly once in this forward."""
        if any(n != 1 for n in self.calls):
            wrong = {i: n for i, n in enumerate(self.calls) if n != 1}
            raise AttentionBypassed(
                f"the engine's attention ran {wrong} times for layers {sorted(wrong)} (layer: calls; each must run "
                "once per forward): this backbone's layers bypass it, so its outputs would be wrong"
            )

    # -- key positions and masks -------------------------------------------------------------------------------------
    def _mask(self, key: Any, T: int, layout: Any, causal: bool, window: int | None) -> Mask:
        """Where query i of row b may attend to key column s (prefix columns first); built once per key."""
        mask = self._masks.get(key)
        if mask is None:
            seq, valid = layout()  # (B, S) each: the token keys' sequence positions and whether they exist
            Pmax = self.prefix_index.shape[1]
            pseq = torch.arange(Pmax, device=seq.device)[None].expand(seq.shape[0], -1)  # (B, Pmax)
            kseq = torch.cat([pseq, seq], 1)[:, None, :]  # (B, 1, Pmax + S)
            keep = torch.cat([pseq < self.prefix_len[:, None], valid], 1)[:, None, :].expand(-1, T, -1)
            q = self._query_positions(T)[:, :, None]  # (B, T, 1)
            if causal:
                keep = keep & (kseq <= q)
            if window is not None:
                keep = keep & (kseq > q - window)
            mask = self._masks[key] = Mask(keep)
        return mask

    def _query_positions(self, T: int) -> torch.Tensor:
        """(B, T) the sequence position of each query. Padding queries take their row's last real token's, so no
        query row is ever empty (an empty one would turn into NaN, and NaN keys poison every later layer)."""
        i = torch.arange(T, device=self.new.device)[None]  # (1, T)
        past = self.past if self.past is not None else torch.zeros_like(self.new)
        return self.prefix_len[:, None] + past[:, None] + torch.minimum(i, self.new[:, None] - 1)

    def _encode_keys(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """An encoder's keys are its forward's own tokens."""
        t = torch.arange(T, device=self.new.device)[None]  # (1, T)
        return (self.prefix_len[:, None] + t), (t < self.new[:, None])

    def _token_keys(self, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A full layer's token keys: slot positions 0..S-1, real up to the row's tokens after this forward."""
        assert self.past is not None
        t = torch.arange(S, device=self.new.device)[None]  # (1, S)
        return (self.prefix_len[:, None] + t), (t < (self.past + self.new)[:, None])

    def _chunk_keys(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A prefill chunk's own keys (ring layers, attended before they are written): tokens past..past+T-1."""
        assert self.past is not None
        j = torch.arange(T, device=self.new.device)[None]  # (1, T)
        return (self.prefix_len + self.past)[:, None] + j, j < self.new[:, None]

    def _ring_keys(self, C: int, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A ring's C keys: position s holds the latest token t <= last with t = s (mod C); none where t < 0."""
        s = torch.arange(C, device=self.new.device)[None]  # (1, C)
        t = last[:, None] - torch.remainder(last[:, None] - s, C)  # (B, C)
        return self.prefix_len[:, None] + t, t >= 0


class TaskGroups:
    """A decode step's rows grouped by the prefix they attend to: rows of one task version share its pool positions
    (a prefix's first position names it), rows without a prefix form a group of their own (their prefix columns are
    masked). Grouped, each prefix's keys and values are read once per layer instead of once per row.

    index: (G, Pmax) each group's pool positions; members: (G, R) long, each group's rows, padded by repeating its
    first row (padding results are never read); row_group, row_slot: (B,) long, where each row sits in members.
    """

    # When grouping pays, from bench/engine.py --only cascade (2-core CPU, GPT-2 4x256, 64 rows, throughput grouped
    # / per row, two runs): 16 rows per task 0.97-1.00 at P = 16 and 32, 1.04-1.10 at 64, 1.12-1.13 at 128,
    # 1.30-1.57 at 256; one row per task 0.93-0.98 (regrouping costs, nothing is shared). Below these bounds the
    # per-row gather is kept. The grouped matmuls run over G x R query slots (R the largest group, the others padded),
    # so a step of one big group and many single rows is kept per row too (MAX_PADDING).
    MIN_ROWS_PER_GROUP = 2.0
    MIN_PREFIX = 64
    MAX_PADDING = 2.0

    def __init__(
        self, index: torch.Tensor, members: torch.Tensor, row_group: torch.Tensor, row_slot: torch.Tensor
    ) -> None:
        self.index, self.members, self.row_group, self.row_slot = index, members, row_group, row_slot

    @classmethod
    def of(
        cls, prefix_index: torch.Tensor, prefix_len: torch.Tensor, names: Sequence[Hashable] | None = None
    ) -> TaskGroups:
        """Groups from a step's (B, Pmax) prefix positions and (B,) lengths. `names`: each row's prefix identity as
        the host knows it (None for no prefix); without them, a prefix's first pool position names it (a host read
        of B values)."""
        if names is None:
            names = [None if n < 0 else n for n in torch.where(prefix_len > 0, prefix_index[:, 0], -1).tolist()]
        rows: dict[Hashable, list[int]] = {}
        for b, name in enumerate(names):
            rows.setdefault(name, []).append(b)
        groups = list(rows.values())
        R = max(len(g) for g in groups)
        group_of, slot_of = [0] * len(names), [0] * len(names)
        for g, group in enumerate(groups):
            for r, b in enumerate(group):
                group_of[b], slot_of[b] = g, r
        dev = prefix_index.device
        members = torch.tensor([g + [g[0]] * (R - len(g)) for g in groups], device=dev)  # (G, R)
        index = prefix_index[members[:, 0]]  # (G, Pmax)
        return cls(index, members, torch.tensor(group_of, device=dev), torch.tensor(slot_of, device=dev))

    def pays(self, Pmax: int) -> bool:
        B, (G, R) = self.row_group.shape[0], self.members.shape
        return Pmax >= self.MIN_PREFIX and B >= self.MIN_ROWS_PER_GROUP * G and G * R <= self.MAX_PADDING * B

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """Rows (B, H_kv, M, X) -> groups (G, H_kv, R*M, X): each group's rows side by side."""
        G, R = self.members.shape
        y = x[self.members]  # (G, R, H_kv, M, X)
        return y.transpose(1, 2).reshape(G, x.shape[1], R * x.shape[2], x.shape[3])

    def rows(self, y: torch.Tensor) -> torch.Tensor:
        """Groups (G, H_kv, R*M, X) -> rows (B, H_kv, M, X): each row's own results."""
        G, R = self.members.shape
        y = y.view(G, y.shape[1], R, y.shape[2] // R, y.shape[3]).transpose(1, 2)  # (G, R, H_kv, M, X)
        return y[self.row_group, self.row_slot]


class Mask:
    """keep (B, T, S) bool: True where a query may attend to a key; its additive form (B, 1, 1, T, S) fp32 (0 or
    -inf, for the eager path) made on first use and shared by the layers."""

    def __init__(self, keep: torch.Tensor) -> None:
        self.keep = keep
        self._bias: torch.Tensor | None = None

    @property
    def bias(self) -> torch.Tensor:
        if self._bias is None:
            zeros = torch.zeros(self.keep.shape, dtype=torch.float32, device=self.keep.device)
            self._bias = zeros.masked_fill(~self.keep, NEG_INF)[:, None, None]
        return self._bias


def _attention(
    q: torch.Tensor,
    parts: list[tuple[torch.Tensor, torch.Tensor]],
    mask: Mask,
    scale: float,
    f: Features,
    *,
    sdpa: bool,
) -> torch.Tensor:
    """q (B, H, T, D) against key/value sets (B, H_kv, n_i, D) under the mask (B, T, sum n_i) -> (B, T, H, D).
    SDPA over the joined sets where it can (prefill, encode: no soft-cap, no sinks); otherwise the scores of every
    set are computed in place and joined before one softmax."""
    if sdpa and f.softcap is None and f.sinks is None:
        k = torch.cat([k for k, _ in parts], 2)
        v = torch.cat([v for _, v in parts], 2)
        groups = q.shape[1] // k.shape[1]
        if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.keep[:, None], scale=scale)  # (B, H, T, D)
        return out.transpose(1, 2).contiguous()
    return _manual(q, parts, mask, scale, f)


def _manual(
    q: torch.Tensor,
    parts: list[tuple[torch.Tensor, torch.Tensor]],
    mask: Mask,
    scale: float,
    f: Features,
    groups: TaskGroups | None = None,
) -> torch.Tensor:
    """Eager attention over key/value sets kept apart (views into the cache are never copied). Query head h reads
    key/value head h // (H / H_kv), as transformers' repeat_kv lays them out. Soft-cap and sinks as transformers'
    eager paths apply them (Gemma 2, gpt-oss). With `groups`, the first set is one prefix per task group
    (G, H_kv, Pmax, D): each group's queries meet its prefix in one matmul, and its probabilities its values in
    another, then each row takes its own; the softmax still joins every set of the row, so the result is the same."""
    B, H, T, D = q.shape
    Hkv = parts[0][0].shape[1]
    G = H // Hkv
    qg = q.reshape(B, Hkv, G * T, D)  # (B, H_kv, G*T, D): query head h = kv head h // G, group member h % G

    def part_scores(i: int, k: torch.Tensor) -> torch.Tensor:  # (B, H_kv, G*T, n_i)
        if i == 0 and groups is not None:
            return groups.rows(groups.grouped(qg) @ k.transpose(-1, -2))
        return qg @ k.transpose(-1, -2)

    scores = torch.cat([part_scores(i, k) for i, (k, _) in enumerate(parts)], -1) * scale  # (B, H_kv, G*T, S)
    if f.softcap is not None:
        scores = torch.tanh(scores / f.softcap) * f.softcap
    S = scores.shape[-1]
    scores = scores.float().view(B, Hkv, G, T, S) + mask.bias  # (B, H_kv, G, T, S)
    if f.sinks is not None:  # (H,) -> one more column per query, dropped after the softmax
        sinks = f.sinks.float().view(1, Hkv, G, 1, 1).expand(B, -1, -1, T, -1)
        probs = torch.softmax(torch.cat([scores, sinks], -1), dim=-1)[..., :S]
    else:
        probs = torch.softmax(scores, dim=-1)
    probs = probs.to(q.dtype).view(B, Hkv, G * T, S)
    out, start = None, 0
    for i, (k, v) in enumerate(parts):
        n = k.shape[2]
        p = probs[..., start : start + n]  # (B, H_kv, G*T, n)
        term = groups.rows(groups.grouped(p) @ v) if i == 0 and groups is not None else p @ v  # (B, H_kv, G*T, D)
        out = term if out is None else out + term
        start += n
    assert out is not None
    return out.view(B, H, T, D).transpose(1, 2).contiguous()


class GraphInputs:
    """The per-step state of a compiled decode step (compiled.py), read by `prefix_serve_attention` while `active`.

    ForwardState does not trace into one graph: it reads values back to the host per layer (the slot width
    attended, the task groups) and caches masks in a dict. This one object lives for the process and only its
    tensor attributes change between steps, so dynamo lifts them as graph inputs and guards on their shapes (its
    Python ints are constants of a graph), and the graph holds no Python per layer (checked with fullgraph=True).
    Every row is a decode row in slot b (rows are slots 0..B-1, B a batch bucket); padding rows (`real` False)
    write only the scratch slot and their outputs are never read. One object per process: one engine at a time
    may run compiled steps (the service has one engine, on one thread).

    past: (B,) long, tokens already in each row's slot (this step's token is written at `past`).
    real: (B,) bool, the batch's real rows (the others write into the cache's scratch slot).
    prefix_index: (B, Pb) long pool positions, Pb a prefix-width bucket; prefix_len: (B,) long.
    k, v: the SlotCache segments covering positions 0..S-1 (S a slot-width bucket), each the whole
        (L_full, R + 1, H_kv, width_i, D) tensor, its last slot the scratch slot (SlotCache(scratch=True));
        starts: each segment's first position; used: positions of each read.
    layer_index: per layer, its index in a segment.
    """

    def __init__(self) -> None:
        self.active = False
        self.pool: PrefixPool | None = None
        self.past = self.real = self.prefix_index = self.prefix_len = torch.zeros(0)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.starts: tuple[int, ...] = ()
        self.used: tuple[int, ...] = ()
        self.layer_index: tuple[int, ...] = ()
        self.calls: list[int] = []

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, f: Features
    ) -> torch.Tensor:
        """q (B, H, 1, D), the step's k, v (B, H_kv, 1, D) -> (B, 1, H, D): ForwardState.attend's decode case on a
        full layer, with the write masked to real rows and the key columns padded to the buckets (masked)."""
        self.calls[layer] += 1
        assert self.pool is not None
        B, li = q.shape[0], self.layer_index[layer]
        rows = torch.arange(B, device=q.device)
        for seg_k, seg_v, start in zip(self.k, self.v, self.starts, strict=True):
            width, scratch = seg_k.shape[3], seg_k.shape[1] - 1  # the segment's last slot is the scratch slot
            here = self.real & (self.past >= start) & (self.past < start + width)  # (B,): rows writing here
            # Rows not writing here (padding, or their token in another segment) write into the scratch slot: a
            # plain indexed write, which the compiled graph does in place (a masked read-modify-write of the real
            # slots made it copy the layer's whole segment at every write).
            dst = torch.where(here, rows, scratch)  # (B,)
            off = (self.past - start).clamp(0, width - 1)  # (B,)
            # The layer as a tensor index too: an int would write through a view of the layer, which the graph
            # turns into a copy of that view and a scatter back.
            layer_t = torch.full_like(dst, li)  # (B,)
            seg_k[layer_t, dst, :, off] = k[:, :, 0]  # (B, H_kv, D) into (L_full, R + 1, H_kv, width, D)
            seg_v[layer_t, dst, :, off] = v[:, :, 0]
        parts = [self.pool.gather(layer, self.prefix_index)]  # (B, H_kv, Pb, D) each
        parts += [(sk[li][:B, :, :n], sv[li][:B, :, :n]) for sk, sv, n in zip(self.k, self.v, self.used, strict=True)]
        Pb, S = self.prefix_index.shape[1], sum(self.used)
        pseq = torch.arange(Pb, device=q.device)[None]  # (1, Pb)
        t = torch.arange(S, device=q.device)[None]  # (1, S)
        kseq = torch.cat([pseq.expand(B, -1), self.prefix_len[:, None] + t], 1)  # (B, Pb + S)
        keep = torch.cat([pseq < self.prefix_len[:, None], t <= self.past[:, None]], 1)  # (B, Pb + S)
        qpos = (self.prefix_len + self.past)[:, None]  # (B, 1)
        keep = keep & (kseq <= qpos)
        if f.window is not None:
            keep = keep & (kseq > qpos - f.window)
        return _manual(q, parts, Mask(keep[:, None, :]), scale, f)


GRAPH = GraphInputs()
_STATE: ContextVar[ForwardState | None] = ContextVar("prefix_serve_forward", default=None)


def prefix_serve_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if GRAPH.active:  # a compiled decode step: no ContextVar, nothing read back to the host
        features = call_features(module, attention_mask, kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return GRAPH.attend(module.layer_idx, query, key, value, scale, features), None
    state = _STATE.get()
    if state is None:
        raise AttentionBypassed(f"{type(module).__name__}: the engine's attention was called outside an engine forward")
    features = call_features(module, attention_mask, kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return state.attend(module.layer_idx, query, key, value, scale, features), None


AttentionInterface.register(ATTN_NAME, prefix_serve_attention)


@contextlib.contextmanager
def serving(config: Any, state: ForwardState) -> Iterator[None]:
    """Runs one forward of the model through `prefix_serve_attention` with `state`, and checks afterwards that every
    layer's attention ran exactly once. Without a registered mask function transformers builds no mask for it: the
    masks are ours, from lengths."""
    previous = config._attn_implementation
    config._attn_implementation = ATTN_NAME
    token = _STATE.set(state)
    try:
        yield
    finally:
        _STATE.reset(token)
        config._attn_implementation = previous
    state.check_complete()
