"""The device bytes of the per-row LoRA and IA3 tables (low_rank.py, scaling.py), as they are and as a load would
leave them: what the DeviceCache (engine.py) counts, with the prefix pool's used blocks, against its one budget,
PREFIXSERVE_DEVICE_CACHE_BYTES.

The tables hold more than their tasks' own factors and vectors: every row of a module's LoRA tables is as wide as the
widest rank of a task adapting it, row 0 is zeros, freed rows stay allocated, and tables grow in steps (a module's
tables double their rows when none is free and widen to a new task's rank; the IA3 tables double their slots, all
sides at once). So what a load adds is not the task's size: `after` replays those growth rules on the tables' shapes
(LowRankTable.table_shapes, ScaleTable.state), for the tables as they are or once some entries have let go of their
slots. tests/service/runtime/test_lora_ia3.py holds the replay to the tables' own nbytes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .backbone import Backbone
from .methods import DeviceParts
from .runner import DevicePrefix, ModelRunner
from .scaling import Side

Key = tuple[str, str, bool]  # a table: ("lora", path, False) or ("ia3", path, on_input)


@dataclass(frozen=True)
class Adds:
    """What a load puts in the tables: low_rank, each LoRA module's rank; scales, the IA3 sides (None: the task takes
    no slot in that table)."""

    low_rank: dict[str, int] | None = None
    scales: list[Side] | None = None

    @classmethod
    def of(cls, parts: DeviceParts) -> Adds:
        low_rank = None if parts.low_rank is None else {p: int(a.shape[0]) for p, (a, _) in parts.low_rank.items()}
        scales = None if parts.scales is None else [(p, on_input) for p, (_, on_input) in parts.scales.items()]
        return cls(low_rank, scales)


def nbytes(runner: ModelRunner) -> int:
    """What the LoRA and IA3 tables hold on the device now (the LowRankTable's copies of gathered factors kept
    between forwards, a cache of its own bounded by low_rank.KEEP_GATHERED_BYTES, are not the tables)."""
    return _low_rank_after(runner, None, []) + _scales_after(runner, None, [])


def after(runner: ModelRunner, adds: Adds, gone: Iterable[DevicePrefix] = ()) -> int:
    """The tables' device bytes once the entries `gone` have let go of their slots and a task putting `adds` in them
    has been loaded."""
    gone = list(gone)
    low_rank = _low_rank_after(runner, adds.low_rank, [e.lora_slot for e in gone if e.lora_slot])
    return low_rank + _scales_after(runner, adds.scales, [e.scale_slot for e in gone if e.scale_slot])


def alone(bb: Backbone, adds: Adds) -> int:
    """The tables' bytes with only this task in them: no eviction brings its load below that."""
    es = _element_size(bb)
    sizes = bb.linear_sizes
    low_rank = sum(2 * r * sum(sizes[p]) for p, r in (adds.low_rank or {}).items())  # row 0 and its own row
    scales = sum(2 * _width(sizes, s) for s in adds.scales or ())  # slot 0 and its own slot
    return (low_rank + scales) * es


def held(runner: ModelRunner, entry: DevicePrefix) -> int:
    """The table bytes an entry's own rows hold, each at its module's table rank: what pins are counted in."""
    es, sizes = _element_size(runner.bb), runner.bb.linear_sizes
    shapes = runner.low_rank.table_shapes()
    low_rank = sum(shapes[p][1] * sum(sizes[p]) for p in _lora_paths(runner, entry.lora_slot))
    scales = sum(_width(sizes, s) for s in runner.scales.sides_of(entry.scale_slot))
    return (low_rank + scales) * es


def held_after(runner: ModelRunner, adds: Adds) -> int:
    """The table bytes a task's own rows would hold once loaded (`held` of its entry then)."""
    es, sizes = _element_size(runner.bb), runner.bb.linear_sizes
    shapes = runner.low_rank.table_shapes()
    low_rank = sum(max(r, shapes.get(p, (0, 0))[1]) * sum(sizes[p]) for p, r in (adds.low_rank or {}).items())
    scales = sum(_width(sizes, s) for s in adds.scales or ())
    return (low_rank + scales) * es


def keys_of(runner: ModelRunner, entry: DevicePrefix) -> set[Key]:
    """The tables an entry has rows in."""
    lora = {("lora", p, False) for p in _lora_paths(runner, entry.lora_slot)}
    return lora | {("ia3", *s) for s in runner.scales.sides_of(entry.scale_slot)}


def users(runner: ModelRunner) -> Counter[Key]:
    """How many resident tasks have rows in each table: one goes when the last of them lets go."""
    out: Counter[Key] = Counter()
    out.update({("lora", p, False): used for p, (_, _, used, _) in runner.low_rank.table_shapes().items()})
    out.update({("ia3", *s): n for s, n in runner.scales.state()[2].items()})
    return out


def _low_rank_after(runner: ModelRunner, add: dict[str, int] | None, gone: list[int]) -> int:
    """LowRankTable._put's growth replayed: a module's tables go with their last task; a new module's start with one
    row (row 0) at the task's rank; a task finding no free row doubles the rows, one of a wider rank widens them."""
    sizes = runner.bb.linear_sizes
    shapes = runner.low_rank.table_shapes()
    left = Counter(p for slot in gone for p in _lora_paths(runner, slot))
    total = 0
    for path in shapes.keys() | (add or {}).keys():
        rows, rank, used, free = shapes.get(path, (0, 0, 0, 0))
        used, free = used - left[path], free + left[path]
        if used <= 0:
            rows = rank = free = 0
        r = (add or {}).get(path)
        if r is not None:
            if not rows:
                rows, rank, free = 1, r, 0
            if r > rank or not free:
                rows, free = (rows, free) if free else (2 * rows, rows)
                rank = max(r, rank)
        total += rows * rank * sum(sizes[path])
    return total * _element_size(runner.bb)


def _scales_after(runner: ModelRunner, add: list[Side] | None, gone: list[int]) -> int:
    """ScaleTable.alloc's growth replayed: every side's table has a row per slot; a task finding no free slot
    doubles the slots of every table; the last task gone, the slots start over."""
    sizes = runner.bb.linear_sizes
    capacity, free, per_side = runner.scales.state()
    left = Counter(s for slot in gone for s in runner.scales.sides_of(slot))
    tasks = {s: n - left[s] for s, n in per_side.items() if n > left[s]}
    if len(gone) == capacity - 1 - free:  # every slot but 0 and the free ones holds a task: all of them gone
        capacity, free = 1, 0
    else:
        free += len(gone)
    if add is not None:
        if not free:
            capacity = max(2, 2 * capacity)
        tasks.update({s: tasks.get(s, 0) + 1 for s in add})
    return capacity * sum(_width(sizes, s) for s in tasks) * _element_size(runner.bb)


def _lora_paths(runner: ModelRunner, slot: int) -> list[str]:
    if slot <= 0:
        return []
    table = runner.low_rank
    return [table.paths[j] for j in table.rows_of[slot].nonzero().flatten().tolist()]


def _width(sizes: dict[str, tuple[int, int]], side: Side) -> int:
    n_in, n_out = sizes[side[0]]
    return n_in if side[1] else n_out


def _element_size(bb: Backbone) -> int:
    return torch.empty((), dtype=bb.dtype).element_size()
