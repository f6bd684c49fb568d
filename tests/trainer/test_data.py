import json
from pathlib import Path

import pytest

from trainer.data import DataError, load_dataset, load_records, to_examples

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared/data is not beside the checkout")


@needs_shared
def test_e2e_and_sst2_load_as_they_are():
    e2e = load_dataset(SHARED / "e2e" / "trainset.csv", SHARED / "e2e" / "devset.csv", limit=50, dev_limit=20)
    assert e2e.kind == "generation" and len(e2e.train) == 50 and len(e2e.dev) == 20
    assert e2e.train[0].text.startswith("name[") and e2e.train[0].target
    sst = load_dataset(SHARED / "sst2" / "train.tsv", SHARED / "sst2" / "dev.tsv", limit=100, dev_limit=30)
    assert sst.kind == "classification" and sst.labels == ["0", "1"] and len(sst.dev) == 30
    assert sst.train[0].text and sst.train[0].label in ("0", "1")


def test_jsonl_csv_mapping_and_held_out_dev(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "text_pair": "p", "label": "ab"[i % 2]}) for i in range(20)))
    ds = load_dataset(path, dev_fraction=0.25, seed=1)
    assert ds.kind == "classification" and len(ds.dev) == 5 and len(ds.train) == 15
    assert ds.train[0].text_pair == "p" and ds.labels == ["a", "b"]
    assert [e.text for e in load_dataset(path, dev_fraction=0.25, seed=1).dev] == [e.text for e in ds.dev]
    csv = tmp_path / "g.csv"
    csv.write_text("question,answer\nhi,there\nfoo,bar\n")
    kind, ex = to_examples(load_records(csv), {"input": "question", "output": "answer"})
    assert kind == "generation" and (ex[1].text, ex[1].target) == ("foo", "bar")


def test_data_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_records(tmp_path / "missing.jsonl")
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="match no known layout"):
        load_dataset(bad)
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')
    with pytest.raises(DataError, match="at least two labels"):
        load_dataset(one)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"\n')
    with pytest.raises(DataError, match="broken.jsonl:1"):
        load_records(broken)
