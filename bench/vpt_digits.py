"""Visual Prompt Tuning at small scale on real images: scikit-learn's digits (1,797 8x8 images, no download).

No pretrained ViT exists offline, so the paper's setting is rebuilt small: a ViT (4 layers, hidden 64, patches of
2x2) is pre-trained on one task (digits 0-4), frozen, and then adapted to other tasks, every method with the same
data, step budget and batch size:

  linear probe      a linear head over the frozen [CLS] state
  full fine-tuning  every weight of the ViT and the head
  VPT-shallow       prompts at the input only (P tokens) + head
  VPT-deep          prompts at every layer (P tokens each) + head

The VPT rows are trained by the trainer (`python -m trainer` code, image folders written from the arrays) and
their accuracy is the served one: the trainer evaluates each artifact through the serving engine. Tasks: digits 5-9
(five classes the backbone never saw) and parity of all ten digits. Accuracy on a held-out 30% of each task's
images, mean and spread over seeds.

    .venv/bin/python bench/vpt_digits.py                 # 3 seeds (CPU: about 10 minutes)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from prefix_store.jobs import TrainSpec
from service.runtime import wrap_model
from trainer.sweep import served_parameters
from trainer.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["probe", "finetune", "vpt_shallow", "vpt_deep"]
LABELS = {"probe": "linear probe", "finetune": "full fine-tuning", "vpt_shallow": "VPT-shallow", "vpt_deep": "VPT-deep"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=300, help="adaptation steps of every method")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prompts", type=int, default=8, help="P for both VPT methods")
    p.add_argument("--vpt-lr", type=float, default=None, help="default: the method's (prefix_store/methods.py)")
    p.add_argument("--probe-lr", type=float, default=1e-2)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "plots")
    return p.parse_args(argv)


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * (255 / 16)).astype(np.uint8), d.target  # (1797, 8, 8) grey levels, (1797,)


def processor() -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def pixels(images: np.ndarray) -> torch.Tensor:
    rgb = [Image.fromarray(x).convert("RGB") for x in images]
    return processor()(images=rgb, return_tensors="pt")["pixel_values"]  # (n, 3, 8, 8)


def pretrain(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> ViTModel:
    torch.manual_seed(seed)
    cfg = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=3,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        layer_norm_eps=1e-6,
    )
    vit = ViTModel(cfg, add_pooling_layer=False)
    head = torch.nn.Linear(64, int(y.max()) + 1)
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    vit.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(head(vit(pixel_values=x[idx]).last_hidden_state[:, 0]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vit.eval()


def head_only_or_full(kind: str, vit: ViTModel, data, args, seed: int) -> tuple[float, int]:
    """The probe and fine-tuning baselines (outside the trainer: no prompts to serve)."""
    (xt, yt), (xd, yd) = data
    torch.manual_seed(seed)
    model = copy.deepcopy(vit)
    head = torch.nn.Linear(64, int(max(yt.max(), yd.max())) + 1)
    if kind == "probe":
        model.requires_grad_(False)
        params, lr = list(head.parameters()), args.probe_lr
    else:
        model.train()
        params, lr = list(model.parameters()) + list(head.parameters()), args.finetune_lr
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(args.steps):
        idx = torch.randint(0, len(xt), (args.batch_size,), generator=g)
        loss = F.cross_entropy(head(model(pixel_values=xt[idx]).last_hidden_state[:, 0]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (head(model(pixel_values=xd).last_hidden_state[:, 0]).argmax(-1) == yd).float().mean().item()
    return acc, sum(p.numel() for p in params)


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        d = root / f"c{lab}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i}.png")
    return root


def vpt(method: str, vit: ViTModel, split, args, seed: int, work: Path) -> tuple[float, int]:
    """`work`: a folder of its own for this task and seed."""
    (it, yt), (idev, ydev) = split
    train_dir = write_folder(work / f"{method}-train", it, yt)
    dev_dir = write_folder(work / f"{method}-dev", idev, ydev)
    bb = wrap_model(copy.deepcopy(vit), None, name="digits-vit")
    bb.image_processor = processor()
    spec = TrainSpec(
        task="digits",
        method=method,
        data=str(train_dir),
        dev_data=str(dev_dir),
        dev_limit=100_000,
        steps=args.steps,
        batch_size=args.batch_size,
        num_virtual_tokens=args.prompts,
        lr=args.vpt_lr,
        eval_every=args.steps,
        patience=1_000,
        seed=seed,
        weight_decay=0.0,
    )
    result = Trainer(bb, spec).run()
    return result.metrics["accuracy"], served_parameters(result.artifact)


def tasks(images: np.ndarray, target: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    late = target >= 5
    return {"digits 5-9": (images[late], target[late] - 5), "parity": (images, target % 2)}


def split(images: np.ndarray, labels: np.ndarray, seed: int):
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    cut = int(0.7 * len(images))
    return (images[order[:cut]], labels[order[:cut]]), (images[order[cut:]], labels[order[cut:]])


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.WARNING)
    images, target = digits()
    early = target < 5
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            vit = pretrain(pixels(images[early]), torch.tensor(target[early]), args.pretrain_steps, seed)
            for name, (imgs, labs) in tasks(images, target).items():
                (it, yt), (idev, ydev) = split(imgs, labs, seed)
                tensors = ((pixels(it), torch.tensor(yt)), (pixels(idev), torch.tensor(ydev)))
                row = results.setdefault(name, {})
                for method in args.methods:
                    if method in ("probe", "finetune"):
                        acc, n = head_only_or_full(method, vit, tensors, args, seed)
                    else:
                        work = Path(tmp) / f"{name.replace(' ', '_')}-{seed}"
                        acc, n = vpt(method, vit, ((it, yt), (idev, ydev)), args, seed, work)
                    entry = row.setdefault(method, {"accs": [], "trainable": n})
                    entry["accs"].append(acc)
                    print(f"  seed {seed} {name:<11} {method:<12} {acc:.2%}  ({n:,} trainable)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vpt_digits.json").write_text(json.dumps(results, indent=1))
    print_table(results)
    plot(results, args.out / "vpt_digits.png")
    return results


def print_table(results: dict) -> None:
    for task, rows in results.items():
        print(f"\n{task} (held-out 30%)\n")
        print("| method | trainable parameters | accuracy, mean ± std over seeds | seeds |")
        print("|---|---:|---:|---:|")
        for method, r in rows.items():
            accs = r["accs"]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            print(
                f"| {LABELS[method]} | {r['trainable']:,} | {statistics.mean(accs):.2%} ± {spread:.2%} | {len(accs)} |"
            )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5), squeeze=False)
    for ax, (task, rows) in zip(axes[0], results.items(), strict=True):
        names = list(rows)
        means = [statistics.mean(rows[n]["accs"]) * 100 for n in names]
        errs = [statistics.stdev(rows[n]["accs"]) * 100 if len(rows[n]["accs"]) > 1 else 0 for n in names]
        ax.bar(range(len(names)), means, yerr=errs, capsize=3, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), [LABELS[n] for n in names], fontsize=8)
        ax.set_ylim(min(means) - 10, 100)
        ax.set(ylabel="accuracy (%)", title=f"{task} (ViT pre-trained on digits 0-4)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main(parse_args())
