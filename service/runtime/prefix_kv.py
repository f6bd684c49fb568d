"""Pure tensor math for mixed-prefix batches: no I/O, no model, no state.

Letters: B rows, L layers, H_kv key/value heads, P prefix length (Pmax the batch's longest), T tokens (Tmax the
longest), D head dim, S cache columns.

Row i's prefix keys sit in a zone of Pmax columns (right-aligned; unused slots masked), then its tokens,
right-padded to Tmax. Prefix keys carry no position, so their slot order does not matter; what matters is that row
i's j-th token gets position P_i + j, exactly as PEFT gives it when the row runs alone (PEFT's cache makes the model
start counting at P). Right padding means every query sees at least one real key, so no attention row is ever fully
masked.
"""

from __future__ import annotations

import torch


def prefix_zone(
    kvs: list[torch.Tensor | None],
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks per-row prefixes into one padded zone.

    Args:
        kvs: per row, its prefix key/values (L, 2, H_kv, P_i, D), or None (no prefix).
    Returns:
        zone: (L, 2, B, H_kv, Pmax, D); zone[l, 0] are layer l's keys, contiguous.
        mask: (B, Pmax) bool, True where a prefix slot holds a real key.
    """
    lengths = [0 if p is None else p.shape[3] for p in kvs]
    B, Pmax = len(kvs), max(lengths, default=0)
    zone = torch.zeros(num_layers, 2, B, num_kv_heads, Pmax, head_dim, dtype=dtype, device=device)
    mask = torch.zeros(B, Pmax, dtype=torch.bool, device=device)
    for i, (p, n) in enumerate(zip(kvs, lengths, strict=True)):
        if n:
            zone[:, :, i, :, Pmax - n :] = p
            mask[i, Pmax - n :] = True
    return zone, mask


def right_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ids (B, Tmax) and mask (B, Tmax) bool for right-padded token lists (built as one tensor each)."""
    T = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_id] * (T - len(s)) for s in sequences], dtype=torch.long, device=device)
    lengths = torch.tensor([len(s) for s in sequences], device=device)
    mask = torch.arange(T, device=device)[None] < lengths[:, None]
    return ids, mask


def token_positions(starts: list[int], lengths: list[int], T: int, device: torch.device) -> torch.Tensor:
    """Position ids (B, T): row i's j-th real token gets starts[i] + j; padding gets 0 (always a valid index)."""
    j = torch.arange(T)  # (T,)
    pos = torch.tensor(starts)[:, None] + j[None, :]  # (B, T)
    pos = torch.where(j[None, :] < torch.tensor(lengths)[:, None], pos, torch.zeros_like(pos))
    return pos.to(device)


def pad_columns(x: torch.Tensor, S: int, dim: int) -> torch.Tensor:
    """Left-pads `x` with zeros along `dim` up to size S (extra columns are masked out by the caller)."""
    missing = S - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def compaction_index(mask: torch.Tensor) -> torch.Tensor:
    """For a (B, S) key mask, the (B, S') column index that right-aligns each row's real keys, S' = max real count.

    Real keys keep their relative order; the leading columns of shorter rows point at masked columns.
    """
    S_new = int(mask.sum(1).max())
    # A stable sort on the mask puts masked columns first and real ones after, each group in column order.
    order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices  # (B, S)
    return order[:, mask.shape[1] - S_new :]
