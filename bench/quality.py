"""Quality on real data, measured honestly: every method on SST-2 and MRPC with the real all-MiniLM-L6-v2 backbone.

The protocol (issue 30):

- **Select on validation, report dev once.** Each run carves a validation split from `train.tsv` (seeded,
  stratified, 10% capped at --val-max); early stopping, the best checkpoint and the choice of hyperparameters all
  read it. `dev.tsv` is scored once per final run, on the version the validation split chose.
- **Selection**: per dataset and method, a small grid (GRIDS: learning rate, prompt length, reparametrisation,
  pooling, prefix start) trained once with seed 0 at the step budget; the configuration with the best validation
  accuracy is used for every seed and budget. Full fine-tuning and the probe keep their one configuration.
  --grid small (SMALL_GRIDS) keeps P-Tuning v2's prompt length and reparametrisation only, for a few CPU hours.
- **Two budgets, three seeds.** `steps`: every method --steps steps (early stopping on patience). `time`: full
  fine-tuning is run first per dataset and seed, its training wall-clock (validation evaluations included) recorded,
  and every other method gets that wall-clock as --max-time (early stopping too), which a run keeps to: it stops
  when one more step and its closing evaluation (each timed as the slowest of the last ten) would no longer fit.
  Mean and standard deviation over the seeds, training time and trainable parameters per method.
- **Resumable and splittable.** Results go to `<out>/quality-<dataset>.json` after every run (a file lock guards
  the read-modify-write, so runs split by dataset, method or seed may share it); a run found there is not trained
  again. `--report` rebuilds the table (printed, and written into README.md between its quality-table markers with
  --readme) and the plot (dev accuracy against training time) from the JSON alone.

    .venv/bin/python bench/quality.py --datasets mrpc --seeds 0 1 2            # finetune first, then the rest
    .venv/bin/python bench/quality.py --datasets mrpc --methods p_tuning_v2 --seeds 1   # a slice (needs FT's seed 1)
    .venv/bin/python bench/quality.py --report --readme                         # table + plot from the JSON
    .venv/bin/python bench/quality.py --smoke --out /tmp/q                      # the whole path, tiny

Methods: a linear probe on frozen features, full fine-tuning (both mean-pooled, as the trainer's heads), the trainer's
four prompt-learning methods, BitFit, LoRA and IA3 with a linear head, and a null prompt + BitFit (Logan IV et al.:
"{text} [MASK]" over a verbalizer; MiniLM has no MLM head, so [MASK] is scored against the tied input embeddings).
The trainer's methods are evaluated as served (through the serving engine). --few-shot N trains on N random training
examples per seed. No entailment set is available offline (shared/data holds SST-2, MRPC and E2E only).
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import itertools
import json
import logging
import math
import os
import re
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from transformers import AutoModel

from prefix_store.jobs import TrainSpec
from service.runtime import DEFAULT_BACKBONE, load_backbone, resolve_source
from trainer.data import Dataset, Example, carve_validation, load_dataset
from trainer.sweep import served_parameters
from trainer.train import Budget, Reserve, Trainer, lr_factor, majority_noise

log = logging.getLogger("bench.quality")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PROMPT_METHODS = ["p_tuning_v2", "prefix_tuning", "prompt_tuning", "p_tuning", "bitfit", "null_prompt", "lora", "ia3"]
BASELINES = ["probe", "finetune"]
ALL_METHODS = [*BASELINES, *PROMPT_METHODS]
BUDGETS = ["steps", "time"]
NULL_PROMPT = {  # template and verbalizer per dataset
    "sst2": ("{text} [MASK]", {"0": "terrible", "1": "great"}),
    "mrpc": ("{text} [MASK]", {"0": "no", "1": "yes"}),  # the second sentence stays the second segment
}
LABELS = {
    "probe": "linear probe (frozen, mean-pooled)",
    "finetune": "full fine-tuning",
    "p_tuning_v2": "P-Tuning v2",
    "prefix_tuning": "Prefix-Tuning",
    "prompt_tuning": "prompt tuning",
    "p_tuning": "P-Tuning (LSTM prompt encoder)",
    "bitfit": "BitFit (linear head)",
    "null_prompt": "null prompt + BitFit (verbalizer at [MASK])",
    "lora": "LoRA (r 8, alpha 16; linear head)",
    "ia3": "IA3 (linear head)",
}
BASELINE_LR = {"probe": 1e-2, "finetune": 5e-5}
WARMUP = 0.06


def _grid(**axes: list[Any]) -> list[dict[str, Any]]:
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


# The selection grids, kept small (CPU): the paper's levers where the method has them. P-Tuning v2: prompt length in
# the paper's 16-128, two learning rates, [CLS] vs mean pooling, and its MLP reparametrisation (Prefix-Tuning's
# network, at the learning rate that network trains with). Prefix-Tuning: the MLP's start from real tokens vs random.
GRIDS: dict[str, list[dict[str, Any]]] = {
    "p_tuning_v2": _grid(num_virtual_tokens=[16, 64, 128], lr=[1e-2, 2e-2], pooling=["mean", "cls"])
    + _grid(num_virtual_tokens=[16, 64], lr=[5e-4], reparam=[True]),
    "prefix_tuning": _grid(num_virtual_tokens=[16, 64], lr=[5e-4, 1e-3], prefix_init=["random", "activations"]),
    "prompt_tuning": _grid(num_virtual_tokens=[16, 64], lr=[1e-2, 3e-2]),
    "p_tuning": _grid(num_virtual_tokens=[16, 64], lr=[1e-3, 3e-3]),
    "bitfit": _grid(lr=[1e-3, 2e-3, 5e-3], pooling=["mean", "cls"]),
    "null_prompt": _grid(lr=[3e-3, 1e-2]),
    "lora": _grid(lr=[1e-3, 5e-3]),
    "ia3": _grid(lr=[1e-2, 3e-2]),
}
# --grid small, for a run that must fit a few CPU hours: P-Tuning v2's prompt length (the paper's lever per task, at
# the trainer's learning rate) and its reparametrisation; every other method keeps the trainer's defaults.
SMALL_GRIDS: dict[str, list[dict[str, Any]]] = {
    "p_tuning_v2": _grid(num_virtual_tokens=[16, 64, 128], lr=[2e-2])
    + _grid(num_virtual_tokens=[64], lr=[5e-4], reparam=[True]),
}


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module's docstring as written, and every option's default."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Help)
    p.add_argument(
        "--datasets",
        "--dataset",
        nargs="+",
        default=["sst2", "mrpc"],
        choices=["sst2", "mrpc"],
        help="each its own JSON",
    )
    p.add_argument("--methods", nargs="+", default=ALL_METHODS, choices=ALL_METHODS, help="finetune runs first")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="final runs' seeds (selection: seed 0)")
    p.add_argument("--budgets", nargs="+", default=BUDGETS, choices=BUDGETS, help="equal steps, FT's wall-clock")
    p.add_argument("--steps", type=int, default=1000, help="the equal-steps budget (and the selection runs')")
    p.add_argument("--batch-size", type=int, default=32, help="every method's")
    p.add_argument("--eval-every", type=int, default=50, help="steps between two validation evaluations")
    p.add_argument("--patience", type=int, default=8, help="evaluations without improvement before stopping")
    p.add_argument("--val-max", type=int, default=1000, help="validation examples at most (10%% of train)")
    p.add_argument("--no-select", action="store_true", help="skip the grids: the trainer's method defaults")
    p.add_argument("--grid", choices=["full", "small"], default="full", help="GRIDS, or SMALL_GRIDS")
    p.add_argument("--train-limit", type=int, default=None, help="read the first N training examples")
    p.add_argument("--dev-limit", type=int, default=None, help="report on the first N dev examples")
    p.add_argument("--few-shot", type=int, default=None, help="train on N random examples per seed")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "plots", help="quality-<dataset>.json, the plot")
    p.add_argument("--report", action="store_true", help="no training: the table and plot from the JSON")
    p.add_argument("--readme", action="store_true", help="with --report: write the table into README.md")
    p.add_argument("--smoke", action="store_true", help="tiny: 48 training examples, 2 steps, 1 config a grid")
    args = p.parse_args(argv)
    if args.smoke:  # every path of the protocol, on a handful of examples: seconds, not hours
        args.steps, args.batch_size, args.eval_every, args.patience, args.val_max = 2, 4, 1, 1, 8
        args.train_limit, args.dev_limit = args.train_limit or 48, args.dev_limit or 16
    return args


def max_length(dataset: str) -> int:
    return 128 if dataset == "mrpc" else 64


def data_of(dataset: str, args: argparse.Namespace, seed: int) -> Dataset:
    """train / validation (carved from train, seeded by `seed`, as the trainer carves it) / dev."""
    d = DATA / dataset
    data = load_dataset(
        d / "train.tsv",
        d / "dev.tsv",
        limit=args.train_limit,
        dev_limit=args.dev_limit,
        seed=seed,
        val_fraction=0.1,
        val_max=args.val_max,
    )
    if args.few_shot:
        data = few_shot(data, args.few_shot, seed)
    return data


def few_shot(data: Dataset, n: int, seed: int) -> Dataset:
    """n training examples drawn at random (seeded), their validation split carved from them; dev unchanged."""
    g = torch.Generator().manual_seed(1000 + seed)
    pool = data.train + data.val
    picked = [pool[i] for i in torch.randperm(len(pool), generator=g)[:n].tolist()]
    train, val = carve_validation(picked, data.kind, 0.1, None, seed)
    return Dataset(data.kind, train, data.dev, data.labels, val)


def records(examples: list[Example]) -> list[dict[str, Any]]:
    return [
        {"text": e.text, "label": e.label} | ({"text_pair": e.text_pair} if e.text_pair is not None else {})
        for e in examples
    ]


# -- the results file: one per dataset, merged under a lock ---------------------------------------------------------
def results_path(out: Path, dataset: str) -> Path:
    return out / f"quality-{dataset}.json"


@contextmanager
def locked(path: Path):
    """An exclusive lock beside `path`: runs split by method or seed update one file without losing each other's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def record(path: Path, section: str, key: str, value: dict[str, Any], meta: dict[str, Any]) -> None:
    """results[section][key] = value, read again and written atomically under the lock."""
    with locked(path):
        results = load(path)
        results.update({k: v for k, v in meta.items() if k not in results})
        results.setdefault(section, {})[key] = value
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(path)


# -- baselines outside the trainer: a probe and full fine-tuning, with the trainer's budgets and validation -----------
_TOKENIZER: Any = None


def encode(examples: list[Example], length: int) -> dict[str, torch.Tensor]:
    pairs, texts = [e.text_pair for e in examples], [e.text for e in examples]
    kw = {"padding": True, "truncation": True, "max_length": length, "return_tensors": "pt"}
    return _TOKENIZER(texts, pairs, **kw) if any(p is not None for p in pairs) else _TOKENIZER(texts, **kw)


def mean_pool(model: Any, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    h = model(**enc).last_hidden_state  # (B, T, hidden)
    m = enc["attention_mask"][..., None].float()
    return (h * m).sum(1) / m.sum(1)  # (B, hidden)


@torch.no_grad()
def accuracy(model: Any, head: torch.nn.Module, examples: list[Example], labels: list[str], length: int) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(examples), 128):
        chunk = examples[start : start + 128]
        pred = head(mean_pool(model, encode(chunk, length))).argmax(-1).tolist()
        correct += sum(labels[p] == e.label for p, e in zip(pred, chunk, strict=True))
    return correct / max(1, len(examples))


def baseline(kind: str, data: Dataset, args: argparse.Namespace, seed: int, length: int, budget: Budget) -> dict:
    """A probe (frozen backbone, linear head) or full fine-tuning, trained as the trainer trains (budget, warm-up and
    linear decay, validation every --eval-every steps, patience, best version kept), dev scored once."""
    global _TOKENIZER
    torch.manual_seed(seed)
    if _TOKENIZER is None:
        _TOKENIZER = load_backbone(DEFAULT_BACKBONE, local_files_only=True).tokenizer
    model = AutoModel.from_pretrained(resolve_source(DEFAULT_BACKBONE))
    labels = data.labels
    head = torch.nn.Linear(model.config.hidden_size, len(labels))
    tuned = kind == "finetune"
    model.requires_grad_(tuned)
    params = (list(model.parameters()) if tuned else []) + list(head.parameters())
    lr = BASELINE_LR[kind]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    start = time.monotonic()
    step, best, bad, best_step, best_s, best_state, history = 0, -math.inf, 0, 0, 0.0, None, []
    reason, reserve = None, Reserve()  # a time budget keeps back what the trainer does
    while reason is None:
        elapsed = time.monotonic() - start
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(budget.progress(step, elapsed), WARMUP, "linear")
        if len(order) < args.batch_size:
            order += torch.randperm(len(data.train), generator=g).tolist()
        ex, order = [data.train[i] for i in order[: args.batch_size]], order[args.batch_size :]
        model.train(tuned)
        with torch.set_grad_enabled(tuned):
            x = mean_pool(model, encode(ex, length))
        loss = F.cross_entropy(head(x), torch.tensor([labels.index(e.label) for e in ex]))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        now = time.monotonic() - start
        reserve.steps.append(now - elapsed)
        reason = budget.reached(step, now, reserve.seconds)
        if step % args.eval_every == 0 or reason:
            evaluated = time.monotonic()
            acc = accuracy(model, head, data.val, labels, length)
            reserve.evals.append(time.monotonic() - evaluated)
            history.append({"step": step, "accuracy": acc, "train_loss": loss.item()})
            if acc > best:
                best, bad, best_step, best_s = acc, 0, step, time.monotonic() - start
                best_state = copy.deepcopy((model.state_dict() if tuned else None, head.state_dict()))
            else:
                bad += 1
            reason = reason or ("converged" if best >= 1.0 else None) or ("patience" if bad >= args.patience else None)
            reason = reason or budget.reached(step, time.monotonic() - start, reserve.seconds)
    seconds = time.monotonic() - start
    assert best_state is not None, "an evaluation always runs before the end"
    if tuned:
        model.load_state_dict(best_state[0])
    head.load_state_dict(best_state[1])
    dev = accuracy(model, head, data.dev, labels, length)
    majority, noise = majority_noise([e.label for e in data.val])
    stop = {"reason": reason, "step": step, "seconds": round(seconds, 1), "best_step": best_step}
    stop["best_seconds"] = round(best_s, 1)
    return {
        "dev": dev,
        "val": best,
        "seconds": seconds,
        "steps": step,
        "stop": stop,
        "trainable": sum(p.numel() for p in params),
        "config": {"lr": lr},
        "degenerate": best <= majority + noise,
        "history": history,
    }


# -- the trainer's methods ----------------------------------------------------------------------------------------
def prompt_method(
    method: str,
    dataset: str,
    data: Dataset,
    args: argparse.Namespace,
    seed: int,
    backbone: Any,
    budget: Budget,
    config: dict[str, Any],
) -> dict:
    d = DATA / dataset
    source: dict[str, Any] = {"data": str(d / "train.tsv"), "limit": args.train_limit}
    if args.few_shot:  # the picked examples are the run's train; the trainer carves its validation split from them
        source = {"examples": records(data.train + data.val)}
    extra: dict[str, Any] = {}
    if method == "null_prompt":
        template, verbalizer = NULL_PROMPT[dataset]
        extra = {"template": template, "verbalizer": verbalizer}
    spec = TrainSpec(
        task=dataset,
        method="bitfit" if method == "null_prompt" else method,
        **source,
        **extra,
        **config,
        dev_data=str(d / "dev.tsv"),
        dev_limit=args.dev_limit or 100_000,
        steps=budget.steps,
        max_time=budget.seconds,
        batch_size=args.batch_size,
        max_length=max_length(dataset),
        eval_every=args.eval_every,
        patience=args.patience,
        val_fraction=0.1,
        val_max=args.val_max,
        checkpoint_every=10_000_000,
        seed=seed,
    )
    result = Trainer(backbone, spec).run()
    return {
        "dev": result.metrics["accuracy"],
        "val": result.val_metrics.get("accuracy"),
        "seconds": result.stop["seconds"],
        "steps": result.steps,
        "stop": result.stop,
        "trainable": served_parameters(result.artifact),
        "config": config,
        "degenerate": result.degenerate is not None,
        "history": result.history,
    }


def run_one(method: str, dataset: str, data: Dataset, args, seed: int, backbone, budget: Budget, config) -> dict:
    if method in BASELINES:
        return baseline(method, data, args, seed, max_length(dataset), budget)
    return prompt_method(method, dataset, data, args, seed, backbone, budget, config)


def select(method: str, dataset: str, args, backbone, path: Path, meta: dict) -> dict[str, Any]:
    """The method's configuration: the grid's best validation accuracy (seed 0, the step budget), each grid run
    recorded as it ends; {} (the trainer's defaults) for the baselines and with --no-select."""
    grids = SMALL_GRIDS if args.grid == "small" else GRIDS
    grid = [] if args.no_select or method in BASELINES else grids.get(method, [])
    if args.smoke:
        grid = grid[:1]
    if not grid:
        return {}
    data = data_of(dataset, args, 0)
    for config in grid:
        key = f"{method}/{json.dumps(config, sort_keys=True)}"
        if key in load(path).get("selection", {}):
            continue
        start = time.perf_counter()
        run = run_one(method, dataset, data, args, 0, backbone, Budget(args.steps, None, None), config)
        run.pop("history")
        record(path, "selection", key, run, meta)
        print(f"  select {method:<14} {config}: val {run['val']:.2%} ({time.perf_counter() - start:.0f} s)", flush=True)
    done = load(path)["selection"]
    scored = [(done[f"{method}/{json.dumps(c, sort_keys=True)}"], c) for c in grid]
    learned = [(r, c) for r, c in scored if not r["degenerate"]] or scored
    return max(learned, key=lambda rc: rc[0]["val"] or 0.0)[1]  # ties: the earlier config


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    if args.report:
        return report(args)
    backbone = load_backbone(DEFAULT_BACKBONE, local_files_only=True)
    methods = sorted(args.methods, key=lambda m: m != "finetune")  # fine-tuning first: its time is the budget
    for dataset in args.datasets:
        path = results_path(args.out, dataset)
        probe = data_of(dataset, args, 0)
        majority, noise = majority_noise([e.label for e in probe.dev])
        meta = {
            "dataset": dataset,
            "majority_dev": majority,
            "n_train": len(probe.train),
            "n_val": len(probe.val),
            "n_dev": len(probe.dev),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "eval_every": args.eval_every,
            "patience": args.patience,
            "grid": "none" if args.no_select else args.grid,
            "torch_threads": torch.get_num_threads(),
        }
        print(
            f"{dataset}: {meta['n_train']} train, {meta['n_val']} validation (from train), {meta['n_dev']} dev "
            f"(majority class {majority:.2%}, noise +-{noise:.2%}); {args.steps} steps of {args.batch_size}",
            flush=True,
        )
        for method in methods:
            config = select(method, dataset, args, backbone, path, meta)
            for seed, budget_name in itertools.product(args.seeds, args.budgets):
                if method == "finetune" and budget_name == "time":
                    continue  # its own wall-clock: the steps run is the time run
                key = f"{method}/{budget_name}/{seed}"
                if key in load(path).get("runs", {}):
                    continue
                budget = Budget(args.steps, None, None)
                if budget_name == "time":
                    ft = load(path).get("runs", {}).get(f"finetune/steps/{seed}")
                    if ft is None:
                        print(f"  {key}: skipped, full fine-tuning's seed {seed} has not run (run --methods finetune)")
                        continue
                    budget = Budget(None, None, ft["seconds"])
                start = time.perf_counter()
                run = run_one(method, dataset, data_of(dataset, args, seed), args, seed, backbone, budget, config)
                record(path, "runs", key, run, meta)
                print(
                    f"  {key:<28} dev {run['dev']:.2%}  val {run['val']:.2%}  {run['steps']} steps "
                    f"({run['stop']['reason']}), {run['seconds']:.0f} s train, {time.perf_counter() - start:.0f} s",
                    flush=True,
                )
    return report(args)


# -- the report: table and plot from the JSON alone ---------------------------------------------------------------
def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method and budget: dev accuracy mean and std over seeds, validation accuracy, train time, steps."""
    rows = []
    runs = results.get("runs", {})
    for method in ALL_METHODS:
        for budget in BUDGETS:
            name = "steps" if method == "finetune" else budget
            group = [r for k, r in sorted(runs.items()) if re.fullmatch(rf"{method}/{name}/\d+", k)]
            if not group or (method == "finetune" and budget == "time"):
                continue
            devs = [r["dev"] for r in group]
            rows.append(
                {
                    "method": method,
                    "budget": budget,
                    "seeds": len(group),
                    "dev_mean": statistics.mean(devs),
                    "dev_std": statistics.stdev(devs) if len(devs) > 1 else 0.0,
                    "val_mean": statistics.mean(r["val"] or 0.0 for r in group),
                    "seconds": statistics.mean(r["seconds"] for r in group),
                    "steps": statistics.mean(r["steps"] for r in group),
                    "trainable": group[0]["trainable"],
                    "config": group[0]["config"],
                    "stops": sorted({r["stop"]["reason"] for r in group}),
                    "degenerate": sum(bool(r["degenerate"]) for r in group),
                }
            )
    return rows


def table(results: dict[str, Any]) -> str:
    ds = results.get("dataset", "?")
    lines = [
        f"**{ds.upper()}** ({results.get('n_train', 0):,} train, {results.get('n_val', 0):,} validation carved from "
        f"train, {results.get('n_dev', 0):,} dev; majority class {results.get('majority_dev', 0):.2%}; equal steps = "
        f"{results.get('steps', '?')} of {results.get('batch_size', '?')}, validation every "
        f"{results.get('eval_every', '?')} steps, patience {results.get('patience', '?')}, selection grid "
        f"{results.get('grid', '?')})",
        "",
        "| method | budget | dev accuracy, mean ± std | seeds | val accuracy | train time (s) | steps | stopped by | "
        "trainable parameters | chosen on validation |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in summarize(results):
        budget = "equal steps (its time is the budget)" if r["method"] == "finetune" else r["budget"]
        flag = f" ({r['degenerate']} degenerate)" if r["degenerate"] else ""
        config = ", ".join(f"{k} {v}" for k, v in sorted(r["config"].items())) or "defaults"
        lines.append(
            f"| {LABELS[r['method']]} | {budget} | {r['dev_mean']:.2%} ± {r['dev_std']:.2%}{flag} | {r['seeds']} | "
            f"{r['val_mean']:.2%} | {r['seconds']:.0f} | {r['steps']:.0f} | {', '.join(r['stops'])} | "
            f"{r['trainable']:,} | {config} |"
        )
    return "\n".join(lines)


def plot(all_results: list[dict[str, Any]], path: Path) -> None:
    """Dev accuracy (mean ± std over seeds) against training time, per method: filled markers at equal steps,
    hollow at fine-tuning's wall-clock."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_results), figsize=(8.5 * len(all_results), 4.5), squeeze=False)
    for ax, results in zip(axes[0], all_results, strict=True):
        for r in summarize(results):
            color = f"C{ALL_METHODS.index(r['method']) % 10}"
            hollow = r["budget"] == "time"
            ax.errorbar(
                r["seconds"],
                r["dev_mean"] * 100,
                yerr=r["dev_std"] * 100,
                fmt="s" if hollow else "o",
                color=color,
                mfc="none" if hollow else color,
                capsize=3,
                label=None if hollow else r["method"],
            )
        ax.axhline(results.get("majority_dev", 0) * 100, ls="--", c="gray", lw=1, label="majority class")
        ax.set_xscale("log")
        ax.set_xlabel("training time, s (log; validation evaluations included)")
        ax.set_ylabel("dev accuracy (%)")
        ax.set_title(f"{results.get('dataset', '?').upper()} (all-MiniLM-L6-v2): o equal steps, □ FT's wall-clock")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: points fill every corner
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


README_MARKERS = ("<!-- quality-table:start -->", "<!-- quality-table:end -->")


def report(args: argparse.Namespace) -> dict[str, Any]:
    all_results = [r for ds in args.datasets if (r := load(results_path(args.out, ds)))]
    if not all_results:
        print(f"no results under {args.out} for {args.datasets}")
        return {}
    text = "\n\n".join(table(r) for r in all_results)
    print("\n" + text)
    plot(all_results, args.out / "quality-time.png")
    if args.readme:
        readme = ROOT / "README.md"
        body = readme.read_text()
        start, end = README_MARKERS
        if start not in body or end not in body:
            raise SystemExit(f"README.md has no {start} ... {end} section to write the table into")
        head, rest = body.split(start, 1)
        readme.write_text(f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")
        print(f"table written into {readme}")
    return {r["dataset"]: r for r in all_results}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(parse_args())
