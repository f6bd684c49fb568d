"""Pure tensor math of the mixed-prefix row layout: no I/O, no model, no state.

Letters: B rows, T tokens (Tmax the longest). A row's tokens are right-padded to Tmax; its prefix key/values are
read from the PrefixPool by the registered attention (attention.py), so they take no columns here. What the layout
must get right is positions: row i's j-th token gets position start_i + j, start_i = P_i + (tokens already in its
cache) for a key/value prefix of P_i tokens, exactly as PEFT gives it when the row runs alone (PEFT's cache makes the
model start counting at P). Right padding means every query sees at least one real key, so no attention row is ever
fully masked.
"""

from __future__ import annotations

import torch


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
