"""Training data: JSONL, CSV and TSV files (or inline records) turned into generation or classification examples.

Generation records: {"input", "output"}. Classification: {"text", "label"} or {"text", "text_pair", "label"}.
Files with other column names take a mapping (`{"input": "mr", "output": "ref"}`); the E2E files (mr, ref) and
the SST-2 files (sentence, label) and the MRPC files (#1 String, #2 String, Quality) are recognised as they are.

Errors name the file, the line or record number and what was expected, never what the file holds: a job may point
at a file its submitter cannot read, and the error is sent back to them (a header line, a label, a text or an image
path read from a file is content).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KNOWN_COLUMNS = [  # column names -> our fields, tried in order when no mapping is given
    {"input": "input", "output": "output"},
    {"text": "text", "text_pair": "text_pair", "label": "label"},
    {"text": "text", "label": "label"},
    {"input": "mr", "output": "ref"},  # E2E NLG
    {"text": "sentence", "label": "label"},  # SST-2 / GLUE
    {"text": "#1 String", "text_pair": "#2 String", "label": "Quality"},  # MRPC / GLUE
    {"text": "path", "label": "label"},  # images: a CSV of path,label (paths relative to the CSV's folder)
]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(ValueError):
    pass


@dataclass
class Example:
    text: str  # the prompt (generation) or the text to classify
    target: str | None = None  # generation target
    label: str | None = None  # classification label (as a string: "0", "positive", ...)
    text_pair: str | None = None


@dataclass
class Dataset:
    kind: str  # "generation" | "classification"
    train: list[Example]  # what the optimizer sees
    dev: list[Example]  # reported once, on the best checkpoint: never used to choose anything
    labels: list[str]  # sorted label names (classification), else []
    val: list[Example] = field(default_factory=list)  # carved from train: early stopping, best checkpoint, guard


def load_image_folder(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """An image folder: one sub-folder per class, its images the class's examples (sorted: a stable order)."""
    records = [
        {"path": str(f), "label": d.name}
        for d in sorted(p for p in path.iterdir() if p.is_dir())
        for f in sorted(d.iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not records:
        raise DataError(f"{path}: expected one sub-folder of images per class, found no images")
    return records[:limit] if limit else records


def load_records(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        return load_image_folder(path, limit)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        return _read_records(path, limit)
    except UnicodeDecodeError as e:  # its message quotes the offending bytes
        raise DataError(f"{path}: expected UTF-8 text, found an undecodable byte at offset {e.start}") from None
    except csv.Error as e:
        raise DataError(f"{path}: not readable as {path.suffix or 'CSV'} ({type(e).__name__})") from None


def _read_records(path: Path, limit: int | None) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    if path.suffix == ".jsonl" or path.suffix == ".json":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:  # its message gives a position, never the text
                        raise DataError(f"{path}:{n}: not a JSON object: {e.msg} at column {e.colno}") from None
                    if not isinstance(record, dict):
                        raise DataError(f"{path}:{n}: expected a JSON object, found a {type(record).__name__}")
                    records.append(record)
                if limit and len(records) >= limit:
                    break
        return records
    delimiter = "\t" if path.suffix in (".tsv", ".tab") else ","
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: GLUE's MRPC files start with a byte-order mark
        for row in csv.DictReader(f, delimiter=delimiter, quoting=quoting):
            if row.get("path") and not Path(row["path"]).is_absolute():
                row["path"] = str(path.parent / row["path"])
            records.append(row)
            if limit and len(records) >= limit:
                break
    return records


def to_examples(records: list[dict[str, Any]], columns: dict[str, str] | None = None) -> tuple[str, list[Example]]:
    """Maps records to examples. Returns (kind, examples)."""
    if not records:
        raise DataError("no records")
    keys = set(records[0])
    mapping = columns or next((m for m in KNOWN_COLUMNS if set(m.values()) <= keys), None)
    if mapping is None:  # the columns are not named: a file's header line is its content
        known = "; ".join(",".join(m.values()) for m in KNOWN_COLUMNS)
        raise DataError(
            f"the first record's {len(keys)} columns match no known layout (expected the columns {known}); give a "
            'mapping such as {"input": "mr", "output": "ref"} or {"text": "sentence", "label": "label"}'
        )
    kind = "generation" if "output" in mapping else "classification"
    need = ("input", "output") if kind == "generation" else ("text", "label")
    if any(k not in mapping for k in need):
        raise DataError(f"column mapping {mapping}: expected {need} for {kind}")
    out = []
    for n, r in enumerate(records):
        try:
            if kind == "generation":
                out.append(Example(text=_s(r[mapping["input"]]), target=_s(r[mapping["output"]])))
            else:
                pair = mapping.get("text_pair")
                out.append(
                    Example(
                        text=_s(r[mapping["text"]]),
                        label=_s(r[mapping["label"]]),
                        text_pair=_s(r[pair]) if pair and r.get(pair) is not None else None,
                    )
                )
        except KeyError as e:
            raise DataError(f"record {n}: missing column {e}") from None
    return kind, out


def _s(value: Any) -> str:
    return str(value).strip()


def load_dataset(
    train: str | Path | list[dict[str, Any]],
    dev: str | Path | list[dict[str, Any]] | None = None,
    *,
    columns: dict[str, str] | None = None,
    dev_fraction: float = 0.1,
    limit: int | None = None,
    dev_limit: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.0,
    val_max: int | None = None,
) -> Dataset:
    """Loads train (and dev) examples; without a dev set, holds out `dev_fraction` of train (seeded). Then carves
    the validation split from what is left of train (`carve_validation`): the run selects on it, never on dev."""
    kind, train_ex = to_examples(train if isinstance(train, list) else load_records(train, limit), columns)
    if dev is not None:
        dev_kind, dev_ex = to_examples(dev if isinstance(dev, list) else load_records(dev, dev_limit), columns)
        if dev_kind != kind:
            raise DataError(f"train is {kind} data but dev is {dev_kind}")
    else:
        rng = random.Random(seed)
        order = list(range(len(train_ex)))
        rng.shuffle(order)
        n_dev = max(1, int(len(train_ex) * dev_fraction)) if len(train_ex) > 1 else 0
        dev_ex = [train_ex[i] for i in order[:n_dev]]
        train_ex = [train_ex[i] for i in order[n_dev:]]
    if dev_limit:
        dev_ex = dev_ex[:dev_limit]
    if not train_ex:
        raise DataError("no training examples")
    labels = sorted({e.label for e in train_ex + dev_ex if e.label is not None}) if kind == "classification" else []
    if kind == "classification" and len(labels) < 2:
        raise DataError(f"classification needs at least two labels, found {len(labels)}")
    train_ex, val_ex = carve_validation(train_ex, kind, val_fraction, val_max, seed)
    return Dataset(kind, train_ex, dev_ex, labels, val_ex)


def carve_validation(
    examples: list[Example], kind: str, fraction: float, cap: int | None, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, val): `fraction` of the examples (at most `cap`, at least one; none when fewer than 4 examples or a
    fraction of 0) held out, seeded. Classification is stratified: each label keeps its share in both parts (largest
    remainders, at least one example of a label left to train), so the validation majority rate is the training
    data's. Generation holds out whole inputs (E2E: every reference of a meaning representation on one side), so
    a validation input is never one the run trained on."""
    if fraction <= 0 or len(examples) < 4:
        return examples, []
    n_val = max(1, min(cap or len(examples), round(len(examples) * fraction)))
    rng = random.Random(f"val-{seed}")  # a stream of its own: the dev hold-out above keeps its draw
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        key = (ex.label or "") if kind == "classification" else ex.text
        groups.setdefault(key, []).append(i)
    picked: list[int] = []
    if kind == "classification":
        keys = sorted(groups)
        exact = {k: n_val * len(groups[k]) / len(examples) for k in keys}
        shares = {k: int(exact[k]) for k in keys}
        by_remainder = sorted(keys, key=lambda k: exact[k] - shares[k], reverse=True)
        for k in by_remainder[: n_val - sum(shares.values())]:  # largest remainders: the shares sum to n_val
            shares[k] += 1
        for key in keys:
            members = groups[key]
            rng.shuffle(members)
            picked += members[: min(shares[key], len(members) - 1)]
    else:
        keys = sorted(groups)
        rng.shuffle(keys)
        for key in keys:
            if len(picked) >= n_val:
                break
            if len(picked) + len(groups[key]) < len(examples):
                picked += groups[key]
    chosen = set(picked)
    return [ex for i, ex in enumerate(examples) if i not in chosen], [examples[i] for i in sorted(chosen)]
