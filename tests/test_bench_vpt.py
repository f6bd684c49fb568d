"""bench/vpt_digits.py runs end to end at tiny sizes: the benchmark cannot rot unnoticed."""

import pytest

from bench import vpt_digits


@pytest.mark.slow
def test_vpt_digits_smoke(tmp_path):
    args = vpt_digits.parse_args(f"--seeds 0 --pretrain-steps 5 --steps 3 --prompts 2 --out {tmp_path}".split())
    results = vpt_digits.main(args)
    assert set(results) == {"digits 5-9", "parity"}
    parity = results["parity"]
    assert set(parity) == set(vpt_digits.METHODS) and parity["probe"]["trainable"] == 2 * 64 + 2
    assert parity["vpt_deep"]["trainable"] == 4 * 2 * 64 + 2 * 64 + 2
    assert (tmp_path / "vpt_digits.png").exists()
