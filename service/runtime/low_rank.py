"""Per-task LoRA factors (Hu et al. 2021) served row by row in a mixed batch, batched across tasks as Punica and
S-LoRA do.

A low-rank task adds to the output of each projection m it adapts `x A_t^T B_t^T`, its scale already folded into
B_t (methods/low_rank.py). Each adapted module has its own tables, A (N, r, in) and B^T (N, r, out): row 0 is zeros,
row n one resident task's factors, its rank padded to the table's r with zeros (exact: the padded columns add
products of zeros). A task holds one slot, and `rows_of` (S, M) gives, per slot and module, its row in that module's
tables (0 where it adapts none): a module's tables hold only the tasks that adapt it, so tasks of different target
sets and ranks share the device without each paying for the widest.

A forward carries each row's slot (B,). Its plan, made once per distinct batch of slots and kept (PLANS_KEPT: decode
batches keep their slots from step to step until a row joins or leaves), holds per module some row adapts the rows
it adapts and their rows in its tables, on the device; a module no row adapts runs untouched, and bare rows (or rows
of tasks that leave a module alone) are left out of its update. Each adapted module's forward hook adds the update to
its output in place, either
  gathered: the adapted rows' factors gathered, A[rows] (n, r, in) and B[rows] (n, r, out), then two batched matmuls
      A x^T (n, r, T), transposed, times B^T (n, r, out), added to the rows; one pass whatever the mix of tasks. The
      gathered factors are kept with the plan (up to KEEP_GATHERED_BYTES), so decode steps of the same rows gather
      nothing, or
  grouped: per task of the forward, x[its rows] A^T B^T; no per-row copy of the factors, one matmul pair per task.
The gathered path pays per row (each row reads its own factors), the grouped one per task (its small matmuls): grouped
is taken when the forward has at least GROUPED_MIN_ROWS_PER_TASK adapted rows per LoRA task. bench/lora_paths.py, one
CPU core, over the same forward without LoRA rows, decode: 32 rows, rank 16 on q/v of a 512-wide 4-layer Llama,
gathered +11% to +13% from 2 to 32 tasks (+19% for one task), grouped +6% for 1 to 4 tasks, +12% for 8, +23% for 16,
+39% for 32; 64 rows on GPT-2's c_attn (256 wide, 4 layers), gathered +15% to +24% whatever the mix, grouped +4% to
+9% up to 4 tasks, +14% for 8, +27% for 16, +77% for 64. Grouped wins from about 4 rows per task. Keeping the
gathered factors, against gathering them in every forward: +11% vs +15 to +20% (Llama, 2 to 32 tasks), +19% vs +32%
(GPT-2, 64 tasks). Prefill chunks (64 tokens a row) cost +2% to +5% either way. What is left at 64 tasks is the
factors' own bytes, read once per step: 4 MB a layer on GPT-2's c_attn at rank 16, five times its weights. Hooks are
registered while a module has a resident task, so a server without LoRA tasks runs its forwards untouched.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .backbone import linear_features, linear_modules

Backbone = Any  # backbone.Backbone
# The grouped path (one matmul pair per task over its rows) is taken when a forward has at least this many rows per
# LoRA task; otherwise every row's factors are gathered (see the module docstring for the measurements).
GROUPED_MIN_ROWS_PER_TASK = 4
# Plans kept by their batch's slots: a decode batch keeps its slots from step to step until a row joins or leaves, and
# a step runs at most one other forward (a prefill chunk's), so two keep the decode plan while prefills come and go.
PLANS_KEPT = 2
# A kept plan keeps its gathered factors (each adapted row's A and B) for the next forward of the same slots, unless
# they would take more device memory than this; then they are gathered again in every forward.
KEEP_GATHERED_BYTES = 256 * 2**20


@dataclass
class _Factors:
    """One module's tables: a (N, r, in), b (N, r, out); row 0 zeros, free rows listed."""

    a: torch.Tensor
    b: torch.Tensor
    free: list[int] = field(default_factory=list)
    used: int = 0
    hook: Any = None


@dataclass
class _Module:
    """One adapted module's part of a forward: where (n,) the rows it adapts (None: every row), rows (n,) their rows
    in its tables, both on the device; gathered: their factors A (n, r, in), B (n, r, out) once gathered; groups:
    on the grouped path, per task that adapts it, its row in the tables and its rows of the batch (None: every row).
    """

    factors: _Factors
    where: torch.Tensor | None
    rows: torch.Tensor
    gathered: tuple[torch.Tensor, torch.Tensor] | None = None
    groups: list[tuple[int, torch.Tensor | None]] = field(default_factory=list)


@dataclass
class _Plan:
    """What the forwards of one batch (its rows' slots) apply: batch: B rows; modules: by column, those some row
    adapts; grouped: the path (else gathered); keep: the gathered factors are kept for the next forward of the same
    slots (within KEEP_GATHERED_BYTES)."""

    batch: int
    modules: dict[int, _Module]
    grouped: bool
    keep: bool


class LowRankTable:
    """The LoRA factors of the resident low-rank tasks, and the hooks that apply them (see the module docstring).

    Args:
        backbone: the frozen model; every nn.Linear / Conv1D of its body may be adapted.
    """

    def __init__(self, backbone: Backbone) -> None:
        self.bb = backbone
        self.modules = linear_modules(backbone.body)
        self.paths = list(self.modules)
        self.column = {path: j for j, path in enumerate(self.paths)}
        self.rows_of = torch.zeros(1, len(self.modules), dtype=torch.long)  # (S, M) on the host; slot 0: no task
        self._factors: dict[str, _Factors] = {}
        self._free: list[int] = []
        self._plan: _Plan | None = None
        self._plans: OrderedDict[tuple[int, ...], _Plan] = OrderedDict()  # by the slots of a batch, see PLANS_KEPT

    @property
    def capacity(self) -> int:
        return self.rows_of.shape[0]

    @property
    def nbytes(self) -> int:
        """Device bytes the tables hold (free rows included)."""
        return sum(t.numel() * t.element_size() for f in self._factors.values() for t in (f.a, f.b))

    @property
    def kept_bytes(self) -> int:
        """Device bytes of the gathered factors kept between forwards (at most PLANS_KEPT * KEEP_GATHERED_BYTES)."""
        kept = [t for p in self._plans.values() for m in p.modules.values() for t in m.gathered or ()]
        return sum(t.numel() * t.element_size() for t in kept)

    @property
    def used_bytes(self) -> int:
        """Device bytes of the rows resident tasks use (at the tables' padded rank): what a budget bounds."""
        return sum(f.used * (f.a[0].numel() + f.b[0].numel()) * f.a.element_size() for f in self._factors.values())

    def table_shapes(self) -> dict[str, tuple[int, int, int, int]]:
        """Per adapted module its tables' (rows, rank, rows in use, free rows): what the device budget predicts a
        load's growth from (table_budget.py replays _put's growth on them)."""
        return {p: (f.a.shape[0], f.a.shape[1], f.used, len(f.free)) for p, f in self._factors.items()}

    @torch.inference_mode()  # the tables are inference tensors, whichever thread lets a task go
    def alloc(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Writes a task's factors (path -> (A (r, in), B (out, r)), checked against the backbone) into the module
        tables; returns its slot."""
        if not self._free:
            wider = self.rows_of.new_zeros(max(2, 2 * self.capacity), self.rows_of.shape[1])
            wider[: self.capacity] = self.rows_of
            self._free = list(range(wider.shape[0] - 1, self.capacity - 1, -1))  # lowest slot handed out first
            self.rows_of = wider
        slot = self._free.pop()
        self._plans.clear()  # tables may be reallocated, modules gain hooks: plans are made again
        try:
            for path, (a, b) in factors.items():
                self.rows_of[slot, self.column[path]] = self._put(path, a, b)
        except BaseException:  # e.g. out of device memory growing a table: what was written goes back, nothing leaks
            self.release(slot)
            for path in [p for p, f in self._factors.items() if not f.used]:  # tables made for this task alone
                self._factors.pop(path).hook.remove()
            raise
        return slot

    @torch.inference_mode()
    def release(self, slot: int) -> None:
        if slot <= 0:
            return
        self._plans.clear()
        for j in self.rows_of[slot].nonzero().flatten().tolist():
            path = self.paths[j]
            f = self._factors[path]
            f.free.append(int(self.rows_of[slot, j]))
            f.used -= 1
            if f.used == 0:  # nobody adapts the module any more: its hook and tables go
                f.hook.remove()
                del self._factors[path]
        self.rows_of[slot] = 0
        self._free.append(slot)

    def _put(self, path: str, a: torch.Tensor, b: torch.Tensor) -> int:
        """Writes one module's factors into a free row of its tables (made, widened to rank r, or doubled as
        needed); returns the row. B is stored transposed, (r, out) per row: the batched matmul then reads it
        row-major (measured 1.6x faster than (out, r) transposed at 64 rows of rank 16)."""
        r = a.shape[0]
        f = self._factors.get(path)
        if f is None:
            n_in, n_out = linear_features(self.modules[path])
            dt, dev = self.bb.dtype, self.bb.device
            f = _Factors(torch.zeros(1, r, n_in, dtype=dt, device=dev), torch.zeros(1, r, n_out, dtype=dt, device=dev))
            f.hook = self.modules[path].register_forward_hook(self._hook(path))
            self._factors[path] = f
        (N, R, n_in), n_out = f.a.shape, f.b.shape[2]
        if r > R or not f.free:  # a wider rank, or no free row: new tables, the old rows copied in
            wider_N, wider_R = N if f.free else 2 * N, max(r, R)
            a_new, b_new = f.a.new_zeros(wider_N, wider_R, n_in), f.b.new_zeros(wider_N, wider_R, n_out)
            a_new[:N, :R] = f.a
            b_new[:N, :R] = f.b
            f.free += range(wider_N - 1, N - 1, -1)  # lowest row handed out first
            f.a, f.b = a_new, b_new
        row = f.free.pop()
        f.a[row].zero_()
        f.b[row].zero_()
        f.a[row, :r] = a
        f.b[row, :r] = b.T
        f.used += 1
        return row

    @contextlib.contextmanager
    def rows(self, slots: torch.Tensor | None) -> Iterator[None]:
        """The forward inside adds the LoRA updates of `slots` (B,) row by row; None (or all zeros): none."""
        self._plan = self._plan_for(slots) if slots is not None and self._factors else None
        try:
            yield
        finally:
            self._plan = None

    def _plan_for(self, slots: torch.Tensor) -> _Plan | None:
        host = tuple(slots.tolist())
        key = (GROUPED_MIN_ROWS_PER_TASK, KEEP_GATHERED_BYTES, *host)  # the settings too: changed, they apply at once
        plan = self._plans.pop(key, None)
        if plan is None:
            plan = self._make_plan(host)
            if not plan.modules:  # no LoRA row: nothing to apply, nor to keep in the place of a plan that has some
                return None
        self._plans[key] = plan  # most recently used last
        while len(self._plans) > PLANS_KEPT:
            self._plans.popitem(last=False)
        return plan

    def _make_plan(self, host: tuple[int, ...]) -> _Plan:
        tasks = sorted(set(host) - {0})
        rows = self.rows_of[list(host)]  # (B, M) on the host
        dev = self.bb.device
        modules = {}
        for j in (rows != 0).any(0).nonzero().flatten().tolist():
            path = self.paths[j]
            adapted = rows[:, j].nonzero().flatten()  # the rows the module adapts
            every = len(adapted) == len(host)
            where = None if every else adapted.to(dev)
            modules[j] = _Module(self._factors[path], where, rows[adapted, j].to(dev))
        lora_rows = sum(1 for s in host if s)  # bare rows cost neither path anything: only adapted rows are counted
        grouped = bool(tasks) and lora_rows >= GROUPED_MIN_ROWS_PER_TASK * len(tasks)
        if grouped:
            alone = len(tasks) == 1 and 0 not in host  # one task's rows only: no row selection at all
            of_task = {t: torch.tensor([i for i, s in enumerate(host) if s == t], device=dev) for t in tasks}
            for j, m in modules.items():
                m.groups = [
                    (int(self.rows_of[t, j]), None if alone else of_task[t]) for t in tasks if self.rows_of[t, j]
                ]
        gathered_bytes = sum(len(m.rows) * (m.factors.a[0].numel() + m.factors.b[0].numel()) for m in modules.values())
        keep = gathered_bytes * next(iter(self._factors.values())).a.element_size() <= KEEP_GATHERED_BYTES
        return _Plan(len(host), modules, grouped, keep)

    def _hook(self, path: str) -> Callable[[torch.nn.Module, Any, torch.Tensor], None]:
        j = self.column[path]

        def add_update(module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
            plan = self._plan
            m = None if plan is None else plan.modules.get(j)
            if m is None:
                return
            assert plan is not None
            f = m.factors
            B = plan.batch
            x = args[0].reshape(B, -1, f.a.shape[2])  # (B, T, in); (B*T, in) where the model flattened tokens
            y = out.view(B, -1, f.b.shape[2])  # (B, T, out)
            if not plan.grouped:  # gathered: the adapted rows' factors, two batched matmuls
                a, b = (
                    m.gathered if m.gathered is not None else (f.a.index_select(0, m.rows), f.b.index_select(0, m.rows))
                )
                if plan.keep:
                    m.gathered = (a, b)
                # A @ x^T (n, r, T), not x @ A^T: each row's A read row-major, as stored (2x faster at decode, with
                # the factors out of cache: bench/lora_paths.py); then (n, T, r) @ B (n, r, out) added to the rows.
                xs = x if m.where is None else x.index_select(0, m.where)
                h = torch.bmm(a, xs.transpose(1, 2)).transpose(1, 2)
                if m.where is None:
                    y.baddbmm_(h, b)
                else:
                    y.index_add_(0, m.where, torch.bmm(h, b))
                return
            for row, where in m.groups:  # grouped: one matmul pair per task over its rows
                if where is None:  # every row of the batch: accumulated in place, no selection
                    y.view(-1, y.shape[2]).addmm_(x.reshape(-1, x.shape[2]) @ f.a[row].T, f.b[row])
                else:
                    y.index_add_(0, where, (x.index_select(0, where) @ f.a[row].T) @ f.b[row])

        return add_update
