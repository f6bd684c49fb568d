"""The row layout's pure tensor helpers: right padding and per-row positions."""

import torch

from service.runtime.prefix_kv import right_pad, token_positions

CPU = torch.device("cpu")


def test_right_pad_and_positions():
    ids, mask = right_pad([[5, 6, 7], [8]], pad_id=0, device=CPU)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    pos = token_positions([4, 0], [3, 1], 3, CPU)
    assert pos.tolist() == [[4, 5, 6], [0, 0, 0]]  # row 1: P=0, one token at 0, padding at 0
