"""Quality on real data: every method on SST-2 and MRPC with the real all-MiniLM-L6-v2 backbone, the same data, step
budget and batch size, mean and spread over seeds, trainable parameter counts, and a plot.

    .venv/bin/python bench/quality.py                          # both datasets, every method, 3 seeds (CPU: hours)
    .venv/bin/python bench/quality.py --datasets mrpc --methods p_tuning_v2 finetune --seeds 0
    .venv/bin/python bench/quality.py --few-shot 32 --seeds 0 1 2 3 4 --methods null_prompt bitfit probe

Methods: a linear probe on frozen features, full fine-tuning (both with the backbone's own mean pooling, as the
trainer's heads), the trainer's four prompt-learning methods (defaults: prefix_store/methods.py), BitFit, LoRA
and IA3 with a linear head (LoRA and IA3 on PEFT's default target modules for BERT), and a null prompt + BitFit
(Logan IV et al.: "{text} [MASK]", the label read at [MASK] over a verbalizer; MiniLM has no MLM head, so [MASK]
is scored against the tied input embeddings). Their accuracy is the served one: the trainer evaluates the final
artifact through the serving engine. --few-shot N trains every method on N random training examples per seed (the
paper's setting: 32, five seeds). Train on shared/data/<dataset>/train.tsv, report accuracy on all of dev.tsv (tune
there; the held-out test sets are not here).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from transformers import AutoModel, get_linear_schedule_with_warmup

from prefix_store.jobs import TrainSpec
from service.runtime import DEFAULT_BACKBONE, load_backbone, resolve_source
from trainer.data import Dataset, load_dataset
from trainer.sweep import served_parameters
from trainer.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PROMPT_METHODS = ["p_tuning_v2", "prefix_tuning", "prompt_tuning", "p_tuning", "bitfit", "null_prompt", "lora", "ia3"]
ALL_METHODS = ["probe", "finetune", *PROMPT_METHODS]
NULL_PROMPT = {  # template and verbalizer per dataset
    "sst2": ("{text} [MASK]", {"0": "terrible", "1": "great"}),
    "mrpc": ("{text} [MASK]", {"0": "no", "1": "yes"}),  # the second sentence stays the second segment
}
LABELS = {
    "probe": "linear probe (frozen, mean-pooled)",
    "finetune": "full fine-tuning",
    "p_tuning_v2": "P-Tuning v2",
    "prefix_tuning": "Prefix-Tuning (MLP reparametrisation)",
    "prompt_tuning": "prompt tuning",
    "p_tuning": "P-Tuning (LSTM prompt encoder)",
    "bitfit": "BitFit (linear head, mean-pooled)",
    "null_prompt": "null prompt + BitFit (verbalizer at [MASK])",
    "lora": "LoRA (r = 8, alpha 16, on query and value; linear head, mean-pooled)",
    "ia3": "IA3 (keys, values, feed-forward inputs; linear head, mean-pooled)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["sst2", "mrpc"], choices=["sst2", "mrpc"])
    p.add_argument("--methods", nargs="+", default=ALL_METHODS, choices=ALL_METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--finetune-lr", type=float, default=5e-5)
    p.add_argument("--probe-lr", type=float, default=1e-2)
    p.add_argument("--dev-limit", type=int, default=None, help="evaluate on the first N dev examples")
    p.add_argument("--few-shot", type=int, default=None, help="train on N random examples per seed")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "plots")
    return p.parse_args(argv)


def max_length(dataset: str) -> int:
    return 128 if dataset == "mrpc" else 64


def data_of(dataset: str, dev_limit: int | None) -> Dataset:
    d = DATA / dataset
    return load_dataset(d / "train.tsv", d / "dev.tsv", dev_limit=dev_limit)


def few_shot(data: Dataset, n: int, seed: int) -> Dataset:
    """n training examples drawn at random (seeded); dev unchanged."""
    g = torch.Generator().manual_seed(1000 + seed)
    picked = [data.train[i] for i in torch.randperm(len(data.train), generator=g)[:n].tolist()]
    return Dataset(data.kind, picked, data.dev, data.labels)


def records(examples) -> list[dict]:
    return [
        {"text": e.text, "label": e.label} | ({"text_pair": e.text_pair} if e.text_pair is not None else {})
        for e in examples
    ]


# -- baselines outside the trainer: a probe and full fine-tuning, pooled as the trainer's heads pool -------------------
def encode(tok, examples, length: int) -> dict[str, torch.Tensor]:
    pairs = [e.text_pair for e in examples]
    texts = [e.text for e in examples]
    if any(p is not None for p in pairs):
        return tok(texts, pairs, padding=True, truncation=True, max_length=length, return_tensors="pt")
    return tok(texts, padding=True, truncation=True, max_length=length, return_tensors="pt")


def mean_pool(model, enc) -> torch.Tensor:
    h = model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    return (h * m).sum(1) / m.sum(1)


def batches(n: int, steps: int, batch_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(n, generator=g).tolist()
        yield order[:batch_size]
        order = order[batch_size:]


def baseline(kind: str, data: Dataset, args, seed: int, length: int) -> tuple[float, int]:
    torch.manual_seed(seed)
    tok = load_backbone(DEFAULT_BACKBONE, local_files_only=True).tokenizer
    model = AutoModel.from_pretrained(resolve_source(DEFAULT_BACKBONE))
    labels = data.labels
    head = torch.nn.Linear(model.config.hidden_size, len(labels))
    if kind == "probe":
        model.eval().requires_grad_(False)
        params, lr = list(head.parameters()), args.probe_lr
    else:
        model.train()
        params, lr = list(model.parameters()) + list(head.parameters()), args.finetune_lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * args.steps), args.steps)
    for idx in batches(len(data.train), args.steps, min(args.batch_size, len(data.train)), seed):
        ex = [data.train[i] for i in idx]
        with torch.set_grad_enabled(kind == "finetune"):
            x = mean_pool(model, encode(tok, ex, length))
        loss = F.cross_entropy(head(x), torch.tensor([labels.index(e.label) for e in ex]))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data.dev), 128):
            chunk = data.dev[start : start + 128]
            pred = head(mean_pool(model, encode(tok, chunk, length))).argmax(-1).tolist()
            correct += sum(labels[p] == e.label for p, e in zip(pred, chunk, strict=True))
    trainable = sum(p.numel() for p in params)
    return correct / len(data.dev), trainable


def prompt_method(method: str, dataset: str, args, seed: int, backbone, data: Dataset) -> tuple[float, int]:
    d = DATA / dataset
    source: dict = {"data": str(d / "train.tsv")}
    if args.few_shot:
        source = {"examples": records(data.train)}
    extra: dict = {}
    if method == "null_prompt":
        template, verbalizer = NULL_PROMPT[dataset]
        extra = {"template": template, "verbalizer": verbalizer}
    spec = TrainSpec(
        task=dataset,
        method="bitfit" if method == "null_prompt" else method,
        **source,
        **extra,
        dev_data=str(d / "dev.tsv"),
        dev_limit=args.dev_limit or 100_000,
        steps=args.steps,
        batch_size=min(args.batch_size, len(data.train)),
        max_length=max_length(dataset),
        eval_every=args.steps,  # one evaluation, of the final artifact, as served
        patience=1_000,
        seed=seed,
    )
    result = Trainer(backbone, spec).run()
    return result.metrics["accuracy"], served_parameters(result.artifact)


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.WARNING)
    backbone = load_backbone(DEFAULT_BACKBONE, local_files_only=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    name = "quality-few-shot.json" if args.few_shot else "quality.json"
    for dataset in args.datasets:
        data = data_of(dataset, args.dev_limit)
        majority = max(sum(e.label == lab for e in data.dev) for lab in data.labels) / len(data.dev)
        print(
            f"{dataset}: {len(data.train)} train, {len(data.dev)} dev (majority class {majority:.2%}); "
            f"{args.steps} steps of {args.batch_size}; torch threads {torch.get_num_threads()}",
            flush=True,
        )
        results[dataset] = {"majority": majority, "methods": {}, "few_shot": args.few_shot, "steps": args.steps}
        for method in args.methods:
            accs, trainable, seconds = [], 0, 0.0
            for seed in args.seeds:
                start = time.perf_counter()
                run_data = few_shot(data, args.few_shot, seed) if args.few_shot else data
                if method in ("probe", "finetune"):
                    acc, trainable = baseline(method, run_data, args, seed, max_length(dataset))
                else:
                    acc, trainable = prompt_method(method, dataset, args, seed, backbone, run_data)
                seconds += time.perf_counter() - start
                accs.append(acc)
                print(f"  {method:<14} seed {seed}: {acc:.2%}  ({time.perf_counter() - start:.0f} s)", flush=True)
            results[dataset]["methods"][method] = {"accs": accs, "trainable": trainable, "seconds": seconds}
            (args.out / name).write_text(json.dumps(results, indent=1))
    print_table(results)
    plot(results, args.out / ("quality-few-shot.png" if args.few_shot else "quality.png"))
    return results


def print_table(results: dict) -> None:
    for dataset, r in results.items():
        shots = f"{r['few_shot']} training examples per seed, " if r.get("few_shot") else ""
        print(f"\n{dataset} (dev; {shots}majority class {r['majority']:.2%})\n")
        print("| method | trainable parameters | dev accuracy, mean ± std over seeds | seeds |")
        print("|---|---:|---:|---:|")
        for method, m in r["methods"].items():
            accs = m["accs"]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            print(
                f"| {LABELS[method]} | {m['trainable']:,} | {statistics.mean(accs):.2%} ± {spread:.2%} | {len(accs)} |"
            )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 3.8), squeeze=False)
    for ax, (dataset, r) in zip(axes[0], results.items(), strict=True):
        names = list(r["methods"])
        means = [statistics.mean(r["methods"][n]["accs"]) * 100 for n in names]
        errs = [
            statistics.stdev(r["methods"][n]["accs"]) * 100 if len(r["methods"][n]["accs"]) > 1 else 0 for n in names
        ]
        ax.bar(range(len(names)), means, yerr=errs, capsize=3, color=[f"C{i}" for i in range(len(names))])
        ax.axhline(r["majority"] * 100, ls="--", c="gray", lw=1, label="majority class")
        ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
        ax.set_ylim(min(means + [r["majority"] * 100]) - 5, 100)
        ax.set_ylabel("dev accuracy (%)")
        ax.set_title(f"{dataset.upper()} (all-MiniLM-L6-v2)")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main(parse_args())
