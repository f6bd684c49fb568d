"""Per-task IA3 vectors (Liu et al. 2022) served row by row in a mixed batch.

An IA3 task multiplies, channel by channel, the output of the projections it adapts (keys, values: `y * l`, l (out,),
the projection's bias scaled with it) or the input of its feed-forward ones (`W (x * l) + b`, l (in,)), as PEFT's
IA3 layers do. Per adapted (module, side) a table (S, width) holds the resident tasks' vectors by slot; row 0 and
the rows of tasks that leave that side alone are ones (`* 1` is exact). A forward carries each row's slot (B,); the
hook of a side some row of the forward scales multiplies by `table[slots]` (B, width): a forward hook for an output,
a forward pre-hook for an input. Rows of other methods take slot 0. Tables and hooks exist while a resident task
scales that side, so a server without IA3 tasks runs its forwards untouched. The per-row mechanism is bias.py's
(bias deltas add, scales multiply); a table per side rather than one for every module, since an IA3 task scales a
handful of a model's projections.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .backbone import linear_features, linear_modules

Backbone = Any  # backbone.Backbone
Side = tuple[str, bool]  # (module path, on_input)


@dataclass
class _Table:
    """One (module, side)'s vectors (S, width), the slots that use it, and its hook."""

    data: torch.Tensor
    users: int
    hook: Any


class ScaleTable:
    """The IA3 vectors of the resident scaling tasks, and the hooks that apply them (see the module docstring).

    Args:
        backbone: the frozen model; every nn.Linear / Conv1D of its body may be scaled.
    """

    def __init__(self, backbone: Backbone) -> None:
        self.bb = backbone
        self.modules = linear_modules(backbone.body)
        self.capacity = 1  # slots, 0 included
        self._tables: dict[Side, _Table] = {}
        self._sides: dict[int, list[Side]] = {}  # slot -> the sides its task scales
        self._free: list[int] = []
        self._slots: torch.Tensor | None = None  # (B,) the current forward's slots, None: no row is scaled
        self._active: set[Side] = set()

    @property
    def nbytes(self) -> int:
        """Device bytes the tables hold (free slots included)."""
        return sum(t.data.numel() * t.data.element_size() for t in self._tables.values())

    @property
    def used_bytes(self) -> int:
        """Device bytes of the vectors resident tasks use: what a budget bounds."""
        return sum(t.users * t.data[0].numel() * t.data.element_size() for t in self._tables.values())

    def state(self) -> tuple[int, int, dict[Side, int]]:
        """(slots, free slots, tasks per scaled side): what the device budget predicts a load's growth from
        (table_budget.py replays alloc's growth on it)."""
        return self.capacity, len(self._free), {side: t.users for side, t in self._tables.items()}

    def sides_of(self, slot: int) -> list[Side]:
        """The sides the task in `slot` scales."""
        return list(self._sides.get(slot, ()))

    @torch.inference_mode()  # the tables are inference tensors, whichever thread lets a task go
    def alloc(self, scales: dict[str, tuple[torch.Tensor, bool]]) -> int:
        """Writes a task's vectors (path -> (vector, on_input), checked against the backbone) into a free slot;
        returns it. A failure (out of device memory) leaves the tables as they were."""
        if not self._free:
            grown = max(2, 2 * self.capacity)
            wider = {  # every table made before any is replaced: a failure leaves them all as they were
                side: torch.cat([t.data, t.data.new_ones(grown - self.capacity, t.data.shape[1])])
                for side, t in self._tables.items()
            }
            for side, t in self._tables.items():
                t.data = wider[side]
            self._free = list(range(grown - 1, self.capacity - 1, -1))  # lowest slot handed out first
            self.capacity = grown
        slot = self._free.pop()
        self._sides[slot] = []
        try:
            for path, (vector, on_input) in scales.items():
                side = (path, on_input)
                table = self._tables.get(side)
                if table is None:
                    module = self.modules[path]
                    n_in, n_out = linear_features(module)
                    width = n_in if on_input else n_out
                    data = torch.ones(self.capacity, width, dtype=self.bb.dtype, device=self.bb.device)
                    hook = (
                        module.register_forward_pre_hook(self._scale_input(side))
                        if on_input
                        else module.register_forward_hook(self._scale_output(side))
                    )
                    table = self._tables[side] = _Table(data, 0, hook)
                table.users += 1
                self._sides[slot].append(side)  # counted before written: release undoes it whatever fails next
                table.data[slot] = vector
        except BaseException:
            self.release(slot)
            raise
        return slot

    @torch.inference_mode()
    def release(self, slot: int) -> None:
        if slot <= 0:
            return
        for side in self._sides.pop(slot):
            table = self._tables[side]
            table.data[slot] = 1
            table.users -= 1
            if table.users == 0:
                table.hook.remove()
                del self._tables[side]
        self._free.append(slot)
        if not self._sides:  # no task left: the next one starts small, not at the widest the tables ever were
            self.capacity, self._free = 1, []

    @contextlib.contextmanager
    def rows(self, slots: torch.Tensor | None) -> Iterator[None]:
        """The forward inside applies the vectors of `slots` (B,) row by row; None (or all zeros): none."""
        tasks = set(slots.tolist()) - {0} if slots is not None and self._sides else set()
        self._active = {side for t in tasks for side in self._sides[t]}
        self._slots = slots if tasks else None
        try:
            yield
        finally:
            self._slots, self._active = None, set()

    def _rows_of(self, side: Side) -> torch.Tensor | None:
        """(B, width) the forward's rows' vectors for `side`, or None when no row of the forward scales it."""
        if self._slots is None or side not in self._active:
            return None
        return self._tables[side].data[self._slots]

    def _scale_output(self, side: Side) -> Callable[[torch.nn.Module, Any, torch.Tensor], None]:
        def scale(module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
            rows = self._rows_of(side)
            if rows is not None:  # out (B, T, out), or (B*T, out) where the model flattened tokens
                out.view(rows.shape[0], -1, rows.shape[1]).mul_(rows[:, None])

        return scale

    def _scale_input(self, side: Side) -> Callable[[torch.nn.Module, Any], Any]:
        def scale(module: torch.nn.Module, args: Any) -> Any:
            rows = self._rows_of(side)
            if rows is None:
                return None
            x = args[0]  # (B, T, in), or (B*T, in)
            scaled = x.reshape(rows.shape[0], -1, rows.shape[1]) * rows[:, None]
            return (scaled.view(x.shape), *args[1:])

        return scale
