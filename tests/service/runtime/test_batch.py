"""DecodeBatch membership changes (filter, concatenate, compaction) leave every row's attention unchanged."""

import copy

import torch

from service.runtime import wrap_model
from service.runtime.batch import DecodeBatch, KVState
from service.runtime.runner import DevicePrefix, ModelRunner, PrefillItem
from tests.models import tiny_model


def _runner():
    return ModelRunner(wrap_model(tiny_model("llama"), None, name="t"))


def _prefix(P, seed):
    g = torch.Generator().manual_seed(seed)
    return DevicePrefix("t", 1, "p_tuning_v2", torch.randn(3, 2, 2, P, 8, generator=g), None, None)


def _prefill(runner, specs):
    """A batch of the prefilled rows (row payloads are their indices) whose tokens are the greedy next tokens."""
    out = runner.prefill([PrefillItem(p, ids) for p, ids in specs])
    return DecodeBatch(list(range(len(specs))), out.kv, out.logits.argmax(-1))


def _snapshot(batch):
    kv = KVState(copy.deepcopy(batch.kv.cache), batch.kv.mask.clone(), batch.kv.next_pos.clone())
    return DecodeBatch(list(batch.rows), kv, batch.tokens.clone())


def _decode(runner, batch):
    return runner.decode(batch.kv, batch.tokens)


def test_compaction_and_filter_do_not_change_logits():
    runner = _runner()
    specs = [(_prefix(2, 0), [5, 6, 7, 8, 9, 10, 11]), (_prefix(9, 1), [12]), (None, [13, 14, 15])]
    batch = _prefill(runner, specs)
    for _ in range(2):
        batch.tokens = _decode(runner, batch).argmax(-1)
    # Row 0 leaves; the survivors' cache then has masked holes. Compare compacted with uncompacted.
    plain = batch.filter([1, 2])
    compacted = _snapshot(plain)
    compacted.compact(max_waste=0.0)
    assert compacted.width < plain.width
    a = _decode(runner, plain)
    b = _decode(runner, compacted)
    assert (a - b).abs().max() < 1e-5


def test_concatenate_pads_the_narrower_batch():
    runner = _runner()
    a = _prefill(runner, [(_prefix(3, 0), [5, 6])])
    b = _prefill(runner, [(_prefix(8, 1), [7, 8, 9, 10, 11])])
    ref_a = _decode(runner, _snapshot(a))
    ref_b = _decode(runner, _snapshot(b))
    merged = DecodeBatch.concatenate(a, b)
    assert merged.rows == [0, 0] and merged.width == max(5, 13)
    assert torch.equal(merged.tokens, torch.cat([a.tokens, b.tokens]))
    out = _decode(runner, merged)
    assert (out[0] - ref_a[0]).abs().max() < 1e-5 and (out[1] - ref_b[0]).abs().max() < 1e-5
    assert DecodeBatch.concatenate(None, b) is b and merged.filter([]) is None
