"""DecodeBatch membership changes (filter, concatenate, compaction) leave every row's attention unchanged."""

import copy

import torch

from service.backbone import wrap_model
from service.batch import DecodeBatch
from service.runner import DevicePrefix, ModelRunner, PrefillItem
from tests.models import tiny_model


def _runner():
    return ModelRunner(wrap_model(tiny_model("llama"), None, name="t"))


def _prefix(P, seed):
    g = torch.Generator().manual_seed(seed)
    return DevicePrefix("t", 1, "p_tuning_v2", torch.randn(3, 2, 2, P, 8, generator=g), None, None)


def _prefill(runner, specs):
    out = runner.prefill([PrefillItem(p, ids) for p, ids in specs])
    out.batch.rows = list(range(len(specs)))
    return out.batch, out.logits.argmax(-1)


def _snapshot(batch):
    return DecodeBatch(list(batch.rows), copy.deepcopy(batch.cache), batch.mask.clone(), batch.next_pos.clone())


def test_compaction_and_filter_do_not_change_logits():
    runner = _runner()
    specs = [(_prefix(2, 0), [5, 6, 7, 8, 9, 10, 11]), (_prefix(9, 1), [12]), (None, [13, 14, 15])]
    batch, tok = _prefill(runner, specs)
    for _ in range(2):
        tok = runner.decode(batch, tok).argmax(-1)
    # Row 0 leaves; the survivors' cache then has masked holes. Compare compacted with uncompacted.
    plain = batch.filter([1, 2])
    keep_tok = tok[[1, 2]]
    compacted = _snapshot(plain)
    compacted.compact(max_waste=0.0)
    assert compacted.width < plain.width
    a = runner.decode(plain, keep_tok)
    b = runner.decode(compacted, keep_tok)
    assert (a - b).abs().max() < 1e-5


def test_concatenate_pads_the_narrower_batch():
    runner = _runner()
    a, ta = _prefill(runner, [(_prefix(3, 0), [5, 6])])
    b, tb = _prefill(runner, [(_prefix(8, 1), [7, 8, 9, 10, 11])])
    ref_a = runner.decode(_snapshot(a), ta)
    ref_b = runner.decode(_snapshot(b), tb)
    merged = DecodeBatch.concatenate(a, b)
    assert merged.rows == [0, 0] and merged.width == max(5, 13)
    out = runner.decode(merged, torch.cat([ta, tb]))
    assert (out[0] - ref_a[0]).abs().max() < 1e-5 and (out[1] - ref_b[0]).abs().max() < 1e-5
    assert DecodeBatch.concatenate(None, b) is b and merged.filter([]) is None
