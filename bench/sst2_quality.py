"""SST-2 quality with the real all-MiniLM-L6-v2 backbone: P-Tuning v2 (prefix-serve's trainer) against a linear
probe on frozen features and full fine-tuning, with the same training data, batch size and number of steps.

    .venv/bin/python bench/sst2_quality.py                  # 1000 steps of 32, all of dev.tsv (CPU: ~20 min)
    .venv/bin/python bench/sst2_quality.py --steps 200      # quicker

Train on shared/data/sst2/train.tsv, report accuracy on shared/data/sst2/dev.tsv. The P-Tuning v2 figure is what
the server serves: the trainer evaluates its artifact through the serving engine.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from transformers import AutoModel, AutoModelForSequenceClassification, get_linear_schedule_with_warmup

from prefix_store.jobs import TrainSpec
from service.runtime import DEFAULT_BACKBONE, load_backbone, resolve_source
from trainer.data import load_dataset
from trainer.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "sst2")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dev-limit", type=int, default=None, help="evaluate on the first N dev sentences")
    p.add_argument("--prefix", type=int, default=16, help="P-Tuning v2 virtual tokens")
    p.add_argument("--ptv2-lr", type=float, default=5e-3)
    p.add_argument("--ptv2-reparam", action="store_true", help="P-Tuning v2 with the MLP reparametrisation")
    p.add_argument("--finetune-lr", type=float, default=5e-5)
    p.add_argument("--probe-lr", type=float, default=1e-2)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", default=["probe", "finetune", "ptv2"])
    return p.parse_args(argv)


def batches(n: int, steps: int, batch_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(n, generator=g).tolist()
        yield order[:batch_size]
        order = order[batch_size:]


def encode(tok, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    return tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


@torch.no_grad()
def accuracy(logits_fn, tok, examples, labels, max_length: int) -> float:
    correct = 0
    for start in range(0, len(examples), 128):
        chunk = examples[start : start + 128]
        pred = logits_fn(encode(tok, [e.text for e in chunk], max_length)).argmax(-1).tolist()
        correct += sum(labels[p] == e.label for p, e in zip(pred, chunk, strict=True))
    return correct / len(examples)


def run_probe(args, data, tok, labels) -> float:
    """Linear probe: a linear layer on frozen mean-pooled sentence embeddings (the model's own pooling)."""
    model = AutoModel.from_pretrained(resolve_source(DEFAULT_BACKBONE)).eval()

    def features(enc):
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].float()
        return (h * m).sum(1) / m.sum(1)

    head = torch.nn.Linear(model.config.hidden_size, len(labels))
    opt = torch.optim.AdamW(head.parameters(), lr=args.probe_lr)
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * args.steps), args.steps)
    for idx in batches(len(data.train), args.steps, args.batch_size, args.seed):
        ex = [data.train[i] for i in idx]
        with torch.no_grad():
            x = features(encode(tok, [e.text for e in ex], args.max_length))
        loss = F.cross_entropy(head(x), torch.tensor([labels.index(e.label) for e in ex]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return accuracy(lambda enc: head(features(enc)), tok, data.dev, labels, args.max_length)


def run_finetune(args, data, tok, labels) -> float:
    model = AutoModelForSequenceClassification.from_pretrained(resolve_source(DEFAULT_BACKBONE), num_labels=len(labels))
    opt = torch.optim.AdamW(model.parameters(), lr=args.finetune_lr, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * args.steps), args.steps)
    model.train()
    for idx in batches(len(data.train), args.steps, args.batch_size, args.seed):
        ex = [data.train[i] for i in idx]
        out = model(
            **encode(tok, [e.text for e in ex], args.max_length),
            labels=torch.tensor([labels.index(e.label) for e in ex]),
        )
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return accuracy(lambda enc: model(**enc).logits, tok, data.dev, labels, args.max_length)


def run_ptv2(args, data) -> float:
    backbone = load_backbone(DEFAULT_BACKBONE, local_files_only=True)
    spec = TrainSpec(
        task="sst2",
        method="p_tuning_v2",
        data=str(args.data / "train.tsv"),
        dev_data=str(args.data / "dev.tsv"),
        dev_limit=args.dev_limit or 100_000,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.ptv2_lr,
        num_virtual_tokens=args.prefix,
        max_length=args.max_length,
        eval_every=args.steps,
        patience=1_000,
        seed=args.seed,
        reparam=args.ptv2_reparam or None,
    )
    result = Trainer(backbone, spec).run()
    return result.metrics["accuracy"]


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    data = load_dataset(args.data / "train.tsv", args.data / "dev.tsv", dev_limit=args.dev_limit)
    labels = data.labels
    tok = load_backbone(DEFAULT_BACKBONE, local_files_only=True).tokenizer
    print(
        f"SST-2: {len(data.train)} train, {len(data.dev)} dev sentences; {args.steps} steps of {args.batch_size}; "
        f"torch threads {torch.get_num_threads()}"
    )
    rows = []
    for name in args.only:
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        if name == "probe":
            acc = run_probe(args, data, tok, labels)
        elif name == "finetune":
            acc = run_finetune(args, data, tok, labels)
        else:
            acc = run_ptv2(args, data)
        rows.append((name, acc, time.perf_counter() - start))
        print(f"{name:>9}: dev accuracy {acc * 100:.2f}%  ({rows[-1][2]:.0f} s)", flush=True)
    fp = load_backbone(DEFAULT_BACKBONE, local_files_only=True).fingerprint
    head = fp.hidden_size * len(labels) + len(labels)
    full = sum(p.numel() for p in AutoModel.from_pretrained(resolve_source(DEFAULT_BACKBONE)).parameters()) + head
    prefix = fp.num_layers * 2 * fp.num_kv_heads * args.prefix * fp.head_dim + head
    names = {
        "probe": ("linear probe (frozen, mean-pooled)", head),
        "finetune": ("full fine-tuning", full),
        "ptv2": (f"P-Tuning v2 (P={args.prefix}, lr {args.ptv2_lr:g}{', MLP' if args.ptv2_reparam else ''})", prefix),
    }
    print("\n| method | trainable parameters | dev accuracy |")
    print("|---|---:|---:|")
    for name, acc, _ in rows:
        print(f"| {names[name][0]} | {names[name][1]:,} | {acc * 100:.2f}% |")


if __name__ == "__main__":
    main()
