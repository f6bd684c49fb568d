"""Pure tensor helpers: table-driven edge cases (no prefix, one row, mixed lengths)."""

import pytest
import torch

from service.runtime.prefix_kv import compaction_index, pad_columns, prefix_zone, right_pad, token_positions

CPU = torch.device("cpu")


def _kv(P, L=2, H=3, D=4, fill=1.0):
    return torch.full((L, 2, H, P, D), fill)


@pytest.mark.parametrize(
    "lengths, Pmax",
    [([], 0), ([None], 0), ([3], 3), ([None, 2, 5], 5), ([4, 4], 4)],
)
def test_prefix_zone_right_aligns_and_masks(lengths, Pmax):
    prefixes = [None if n is None else _kv(n, fill=i + 1.0) for i, n in enumerate(lengths)]
    zone, mask = prefix_zone(prefixes, num_layers=2, num_kv_heads=3, head_dim=4, dtype=torch.float32, device=CPU)
    assert zone.shape == (2, 2, len(lengths), 3, Pmax, 4) and mask.shape == (len(lengths), Pmax)
    for i, n in enumerate(lengths):
        n = n or 0
        assert mask[i].tolist() == [False] * (Pmax - n) + [True] * n
        assert torch.all(zone[:, :, i, :, Pmax - n :] == i + 1.0)
        assert torch.all(zone[:, :, i, :, : Pmax - n] == 0)
    assert all(zone[layer, 0].is_contiguous() for layer in range(2))


def test_right_pad_and_positions():
    ids, mask = right_pad([[5, 6, 7], [8]], pad_id=0, device=CPU)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    pos = token_positions([4, 0], [3, 1], 3, CPU)
    assert pos.tolist() == [[4, 5, 6], [0, 0, 0]]  # row 1: P=0, one token at 0, padding at 0


@pytest.mark.parametrize("mask", [[[1, 1, 1]], [[0, 1, 0, 1], [1, 1, 1, 0]], [[0, 0, 1, 1], [0, 0, 0, 1]]])
def test_compaction_index_right_aligns_real_keys_in_order(mask):
    m = torch.tensor(mask, dtype=torch.bool)
    idx = compaction_index(m)
    assert idx.shape == (m.shape[0], int(m.sum(1).max()))
    for row, cols in zip(m, idx.tolist()):
        real = row.nonzero().flatten().tolist()
        lead = cols[: len(cols) - len(real)]
        assert cols[len(cols) - len(real) :] == real  # real keys last, in their original order
        assert not any(row[c] for c in lead)  # the leading slots point at masked columns


def test_pad_columns_left_pads_with_zeros():
    x = torch.ones(2, 3)
    assert pad_columns(x, 5, 1).tolist() == [[0, 0, 1, 1, 1]] * 2
    assert pad_columns(x, 3, 1) is x
