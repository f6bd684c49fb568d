"""The running rows of the engine and where they live.

Each row owns a slot of the SlotCache from admission to its end. Rows that decode occupy slots 0..n-1 in order,
so a decode forward reads the cache as the view [:n] (no gather, no copy). Rows still prefilling their prompt (in
chunks) occupy slots taken from the top. Per-slot state is kept in tensors indexed by slot (the next token, the
tokens in the slot, the next position, the prefix's pool positions), so a decode step reads slices of them.

A row joining the decoders moves into slot n; a decoder leaving is replaced by the last decoder (one row's
key/values copied, never the whole cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .kv_cache import SlotCache
from .output import TextStream
from .runner import DevicePrefix
from .sampling import SamplingParams
from .step import EngineRequest, Kind


@dataclass(eq=False)
class Row:
    """One running request: its task's prefix (held, so it is never evicted while the row lives), its sampler
    (None: greedy), its output so far (generation), and where it stands.

    slot: its slot in the SlotCache; done: prompt tokens already in the slot; hidden_sum: sum of its prompt's states
    (classification with mean pooling, accumulated over chunks).
    """

    request: EngineRequest
    prefix: DevicePrefix | None
    generator: torch.Generator | None = None
    text: TextStream | None = None
    slot: int = -1
    done: int = 0
    hidden_sum: torch.Tensor | None = None
    # RowOutput.prompt_logprobs, filled chunk by chunk
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    matcher: Any = None  # structured output: the row's grammar state (grammar.Grammars.matcher)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def generates(self) -> bool:
        return self.request.kind is Kind.GENERATE

    @property
    def params(self) -> SamplingParams:
        """A generation row's sampling parameters."""
        params = self.request.params
        assert params is not None, "a generation request carries its sampling parameters (EngineRequest checks)"
        return params

    @property
    def stream(self) -> TextStream:
        """A generation row's output text."""
        assert self.text is not None, "a generation row gets its text stream at admission"
        return self.text

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def kv_len(self) -> int:
        return 0 if self.prefix is None else self.prefix.kv_len


@dataclass
class RunningBatch:
    """Args:
    cache: the slot cache the rows' tokens live in.
    decoding: rows that decode, row i in slot i.
    prefilling: rows whose prompt is not fully prefilled yet, in admission order (each in its own top slot).
    tokens, lengths, positions: (R,) long per slot: the token a decoder feeds next, the tokens in the slot, the
        position id of the next token.
    prefix_index: (R, Pcap) long per slot, its row's prefix positions in the pool; prefix_len: (R,) long.
    table_slots: (R, 3) long per slot, its row's slots in the bias, low-rank and scale tables (DevicePrefix.table_slots;
        0: none).
    counts, seen: (R, V) per slot, the penalties' token history (sampling.TokenHistory), once a row needs it.
    """

    cache: SlotCache
    decoding: list[Row] = field(default_factory=list)
    prefilling: list[Row] = field(default_factory=list)
    # leader request id -> rows of the same prompt and task version that will copy its prefill instead of running
    # their own (the n choices of one prompt); they take a slot when the leader's prompt is in.
    forks: dict[str, list[Row]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        R, dev = self.cache.rows, self.cache.device
        self.tokens = torch.zeros(R, dtype=torch.long, device=dev)
        self.lengths = torch.zeros(R, dtype=torch.long, device=dev)
        self.positions = torch.zeros(R, dtype=torch.long, device=dev)
        self.prefix_len = torch.zeros(R, dtype=torch.long, device=dev)
        self.prefix_index = torch.zeros(R, 0, dtype=torch.long, device=dev)
        self.table_slots = torch.zeros(R, 3, dtype=torch.long, device=dev)
        # The penalties' token history per slot, (R, V) each, allocated when the first row that needs it decodes.
        self.counts: torch.Tensor | None = None  # float: generated tokens
        self.seen: torch.Tensor | None = None  # bool: prompt and generated tokens
        self._free = list(range(R))  # free slots; decoders take the lowest, prefilling rows the highest

    @property
    def rows(self) -> list[Row]:
        return self.decoding + self.prefilling + [r for waiting in self.forks.values() for r in waiting]

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def reserved_tokens(self) -> int:
        return sum(r.request.reserved_tokens for r in self.rows)

    def decode_prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoders' prefix positions (n, Pmax) and lengths (n,), Pmax the longest among them."""
        n = len(self.decoding)
        Pmax = max((r.kv_len for r in self.decoding), default=0)
        return self.prefix_index[:n, :Pmax], self.prefix_len[:n]

    # -- membership -------------------------------------------------------------------------------------------------
    def add_prefilling(self, row: Row) -> None:
        """Gives a new row the highest free slot and records its prefix there."""
        if not self._free:
            raise RuntimeError(f"no free slot: {self.cache.rows} rows already run (the scheduler admits within them)")
        row.slot = self._free.pop()
        self._free.sort()
        self.lengths[row.slot] = 0
        self._set_prefix(row.slot, row)
        self.prefilling.append(row)

    def add_fork(self, row: Row, leader_id: str) -> bool:
        """Lets `row` wait for the prefill of `leader_id` (a row still prefilling the same prompt with the same
        prefix); False when there is no such leader (the row then prefills itself)."""
        leader = next((r for r in self.prefilling if r.request_id == leader_id), None)
        if leader is None or leader.request.prompt_ids != row.request.prompt_ids:
            return False
        if (leader.prefix and leader.prefix.key) != (row.prefix and row.prefix.key):
            return False
        self.forks.setdefault(leader_id, []).append(row)
        return True

    def fork(self, leader: Row) -> list[Row]:
        """The leader's prompt is fully in its slot: each row waiting on it takes a free slot holding a copy of the
        prompt's key/values (the prefix is shared in the pool), as if it had prefilled the prompt itself."""
        rows = self.forks.pop(leader.request_id, [])
        for row in rows:
            self.add_prefilling(row)
            self.cache.move(leader.slot, row.slot, leader.prompt_len)
            self.lengths[row.slot] = leader.prompt_len
            row.done = leader.prompt_len
        return rows

    def start_decoding(self, row: Row, first_token: int) -> None:
        """A row whose prompt is prefilled joins the decoders: it moves to slot n (one row copied)."""
        self.prefilling.remove(row)
        dst = len(self.decoding)
        src = row.slot
        if src != dst:
            other = next((r for r in self.prefilling if r.slot == dst), None)
            if other is None:
                self._free.remove(dst)
                self._move(src, dst)
                self._free.append(src)
                self._free.sort()
            else:  # slot n holds another prefilling row: the two swap slots
                self._swap(src, dst)
                other.slot = src
            row.slot = dst
        self.decoding.append(row)
        self.tokens[dst] = first_token
        self.positions[dst] = row.kv_len + row.prompt_len
        if self.counts is not None and self.seen is not None:
            self.counts[dst] = 0
            self.counts[dst, first_token] = 1
            self.seen[dst] = False
            self.seen[dst, row.request.prompt_ids + [first_token]] = True

    def remove(self, rows: list[Row]) -> None:
        """Rows leave (finished or cancelled). A decoder's hole is filled by the last decoder."""
        leaving = {id(r) for r in rows}
        for leader_id, waiting in list(self.forks.items()):
            waiting[:] = [r for r in waiting if id(r) not in leaving]
            if not waiting:
                del self.forks[leader_id]
        for row in [r for r in self.prefilling if id(r) in leaving]:
            for orphan in self.forks.pop(row.request_id, []):  # the leader left before its prompt was in
                self.add_prefilling(orphan)
            self.prefilling.remove(row)
            self._release(row.slot)
        for row in sorted((r for r in self.decoding if id(r) in leaving), key=lambda r: r.slot, reverse=True):
            last = len(self.decoding) - 1
            if row.slot != last:
                moved = self.decoding[last]
                self._move(last, row.slot)
                moved.slot = row.slot
                self.decoding[row.slot] = moved
            self.decoding.pop()
            self._release(last)

    def advance(self, tokens: torch.Tensor) -> None:
        """After a decode step: every decoder's slot gained its fed token; `tokens` (n,) are fed next."""
        n = len(self.decoding)
        self.lengths[:n] += 1
        self.positions[:n] += 1
        self.tokens[:n] = tokens
        if self.counts is not None and self.seen is not None:
            rows = torch.arange(n, device=tokens.device)
            self.counts[rows, tokens] += 1
            self.seen[rows, tokens] = True

    def ensure_history(self, vocab: int) -> None:
        """Allocates the penalties' token history (a row that needs it is about to decode)."""
        if self.counts is None:
            R, dev = self.cache.rows, self.cache.device
            self.counts = torch.zeros(R, vocab, dtype=torch.float32, device=dev)
            self.seen = torch.zeros(R, vocab, dtype=torch.bool, device=dev)

    def _per_slot(self) -> list[torch.Tensor]:
        per_slot = [self.tokens, self.lengths, self.positions, self.prefix_len, self.prefix_index, self.table_slots]
        if self.counts is not None and self.seen is not None:
            per_slot += [self.counts, self.seen]
        return per_slot

    # -- per-slot state -------------------------------------------------------------------------------------------
    def _set_prefix(self, slot: int, row: Row) -> None:
        P = row.kv_len
        if P > self.prefix_index.shape[1]:
            wider = torch.zeros(self.cache.rows, P, dtype=torch.long, device=self.cache.device)
            wider[:, : self.prefix_index.shape[1]] = self.prefix_index
            self.prefix_index = wider
        self.prefix_len[slot] = P
        self.table_slots[slot] = torch.tensor((0, 0, 0) if row.prefix is None else row.prefix.table_slots)
        index = None if row.prefix is None else row.prefix.index
        if P and index is not None:  # P > 0: the row's prefix has key/values, so an index
            self.prefix_index[slot, :P] = index

    def _move(self, src: int, dst: int) -> None:
        self.cache.move(src, dst, int(self.lengths[src]))
        for t in self._per_slot():
            t[dst] = t[src]

    def _swap(self, a: int, b: int) -> None:
        self.cache.swap(a, b, int(self.lengths[a]), int(self.lengths[b]))
        for t in self._per_slot():
            t[[a, b]] = t[[b, a]]

    def _release(self, slot: int) -> None:
        self._free.append(slot)
        self._free.sort()
