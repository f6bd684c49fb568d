"""Per-task bias deltas (BitFit, Logan IV et al. 2021) served row by row in a mixed batch.

A bias task shifts the bias of modules of the frozen backbone: row r of task t computes, in module m,
`y = x W^T + b + delta_m[t]` (LayerNorm: `gamma * norm(x) + beta + delta_m[t]`). The deltas of the resident bias
tasks live in one table per module, (S, out), slot 0 all zeros; a forward carries each row's slot (B,), and a
forward hook on the module adds `table[slot]` to its output in place. Rows of other methods take slot 0, so bias
rows, prefix rows and bare rows share one forward; the prefix enters through attention, the deltas through the token
projections, and the two compose.

Module paths are transformers' parameter names without the base model's prefix and without ".bias"
("encoder.layer.0.attention.self.query", "h.0.mlp.c_fc"); the masked-LM head's are as in *ForMaskedLM
("cls.predictions.transform.dense"), and "cls.predictions" is the decoder's bias (V,), applied only at the
verbalizer's columns when a verbalizer task scores [MASK] (never through a hook: the full vocabulary is never
computed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers.pytorch_utils import Conv1D

MLM_BIAS = "cls.predictions"  # the masked-LM decoder's bias (V,), tied to cls.predictions.decoder.bias
Backbone = Any  # backbone.Backbone (which imports this module to check bias artifacts)


# Modules whose bias is added along the last dimension of their output, which is where the hook adds a delta:
# linear layers (transformers' Conv1D is GPT-2's), layer norms. Others with a bias parameter are not shifted: a
# convolution's runs along its channel dimension, a mixture-of-experts router returns a tuple.
_BIAS_MODULE_TYPES = (torch.nn.Linear, torch.nn.LayerNorm, Conv1D)


def bias_modules(backbone: Backbone) -> dict[str, torch.nn.Module]:
    """The modules with a bias parameter a bias task may shift, by path: the body's and the masked-LM transform's."""
    out: dict[str, torch.nn.Module] = {}
    roots = [("", backbone.body)]
    if backbone.mlm is not None and backbone.mlm.transform is not None:
        roots.append((MLM_BIAS + ".transform.", backbone.mlm.transform))
    for prefix, root in roots:
        for name, module in root.named_modules():
            bias = getattr(module, "bias", None)
            shifted = isinstance(module, _BIAS_MODULE_TYPES)
            if name and shifted and isinstance(bias, torch.nn.Parameter) and bias.ndim == 1:
                out[prefix + name] = module
    return out


def bias_targets(backbone: Backbone) -> dict[str, torch.Tensor]:
    """Every bias a task may shift, by path, as the backbone holds it (the MLM decoder's included)."""
    out: dict[str, torch.Tensor] = {name: m.get_parameter("bias") for name, m in bias_modules(backbone).items()}
    if backbone.mlm is not None and backbone.mlm.bias is not None:
        out[MLM_BIAS] = backbone.mlm.bias
    return out


class BiasTable:
    """The bias deltas of the resident bias tasks, and the hooks that apply them.

    table: (S, total) in the backbone's dtype, every module's deltas side by side (module m in columns
        offsets[m] : offsets[m] + sizes[m]); row 0 is zeros (rows without deltas), row s a task's slot. A task
        without a delta for some module has zeros there.
    A forward gathers its rows' deltas once, (B, total), and each module's hook adds its columns of that in place:
    one gather per forward, one add per module. Hooks are registered while at least one task is resident, so a
    server without bias tasks runs its forwards untouched.
    """

    def __init__(self, backbone: Backbone) -> None:
        self.bb = backbone
        self.modules = bias_modules(backbone)
        self.sizes = {name: t.numel() for name, t in bias_targets(backbone).items()}
        self.offsets: dict[str, int] = {}
        total = 0
        for name, size in self.sizes.items():
            self.offsets[name] = total
            total += size
        self.table = torch.zeros(1, total, dtype=backbone.dtype, device=backbone.device)
        self._free: list[int] = []
        self._used = 0
        self._rows: torch.Tensor | None = None  # (B, total) the current forward's deltas, or None: no row has any
        self._hooks: list[Any] = []

    @property
    def capacity(self) -> int:
        return self.table.shape[0]

    @property
    def nbytes(self) -> int:
        return 0 if self.capacity == 1 else self.table.numel() * self.table.element_size()

    def alloc(self, deltas: dict[str, torch.Tensor]) -> int:
        """Writes a task's deltas (path -> (out,), checked against the backbone) into a free slot; returns it."""
        if not self._free:
            self._grow(max(2, 2 * self.capacity))
        slot = self._free.pop()
        row = self.table[slot]
        row.zero_()
        for name, delta in deltas.items():
            row[self.offsets[name] : self.offsets[name] + self.sizes[name]] = delta
        self._used += 1
        if not self._hooks:
            self._hooks = [m.register_forward_hook(self._hook(name)) for name, m in self.modules.items()]
        return slot

    def release(self, slot: int) -> None:
        if slot <= 0:
            return
        self._free.append(slot)
        self._used -= 1
        if self._used == 0:
            for h in self._hooks:
                h.remove()
            self._hooks = []

    def _grow(self, capacity: int) -> None:
        wider = self.table.new_zeros(capacity, self.table.shape[1])
        wider[: self.capacity] = self.table
        self._free += range(capacity - 1, self.capacity - 1, -1)  # lowest slot handed out first
        self.table = wider

    @contextlib.contextmanager
    def rows(self, slots: torch.Tensor | None) -> Iterator[None]:
        """The forward inside applies the deltas of `slots` (B,) row by row; None (or all zeros): none."""
        active = slots is not None and self._used and bool(slots.any())
        self._rows = self.table[slots] if active else None  # (B, total)
        try:
            yield
        finally:
            self._rows = None

    def _hook(self, name: str) -> Callable[[torch.nn.Module, Any, torch.Tensor], None]:
        start, size = self.offsets[name], self.sizes[name]

        def add_delta(module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
            rows = self._rows
            if rows is None:
                return
            delta = rows[:, start : start + size]  # (B, out)
            if out.shape[0] != delta.shape[0]:  # the forward's tokens flattened, (B*T, out) (OPT's MLP)
                delta = delta.repeat_interleave(out.shape[0] // delta.shape[0], 0)
            out.add_(delta.view(delta.shape[0], *([1] * (out.ndim - 2)), size))  # out (B, ..., out)

        return add_delta

    def decoder_bias(self, slots: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor | None:
        """The MLM decoder-bias deltas of rows `slots` (n,) at their verbalizer tokens `token_ids` (n, C); None when
        the backbone has no decoder bias."""
        start = self.offsets.get(MLM_BIAS)
        if start is None:
            return None
        return self.table[slots[:, None], start + token_ids]  # (n, C)


def checkpoint_references(backbone: Backbone) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What a BitFit checkpoint is compared with on import (prefix_store.bitfit_io): the biases by module path, and
    every other parameter by name (body names relative to the base model, masked-LM transform names as in
    *ForMaskedLM)."""
    weights = {n: p for n, p in backbone.body.named_parameters() if not n.endswith(".bias")}
    if backbone.mlm is not None and backbone.mlm.transform is not None:
        prefix = MLM_BIAS + ".transform."
        weights |= {prefix + n: p for n, p in backbone.mlm.transform.named_parameters() if not n.endswith(".bias")}
    return bias_targets(backbone), weights


def verbalizer_tokens(tokenizer: Any, pairs: list[tuple[str, str]]) -> tuple[list[str], list[int]]:
    """Labels and their one vocabulary token each, from (label, word) pairs; a word that is not exactly one token
    of this tokenizer is refused, naming how it splits."""
    if tokenizer is None:
        raise ValueError("a verbalizer needs the backbone's tokenizer to find its words' tokens")
    vocab = tokenizer.get_vocab()
    labels, ids = [], []
    for label, word in pairs:
        tid = vocab.get(word)
        if tid is None:
            pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1:
                shown = tokenizer.convert_ids_to_tokens(pieces)[:8]
                raise ValueError(
                    f"verbalizer word {word!r} (label {label!r}) is {len(pieces)} tokens {shown}: expected one"
                )
            tid = pieces[0]
        labels.append(label)
        ids.append(int(tid))
    return labels, ids
