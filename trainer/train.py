"""The training loop: seeded, AdamW with warm-up and linear or cosine decay, gradient accumulation, bf16 autocast on
GPU, budgets in steps, epochs and seconds (the first reached ends the run), periodic evaluation through the serving
engine (what is measured is what is served) on a validation split carved from the training data, early stopping,
checkpoint/resume, and the best version kept. The dev set is evaluated once, on that best version: nothing is chosen
on it. No Redis here: the caller publishes the returned artifact.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from prefix_store import REGISTRY, Family, PrefixArtifact, decode, encode, render_template
from prefix_store.jobs import (
    TRAIN_DATA_SETTING,
    JobPathError,
    PathNotAllowed,
    TrainSpec,
    allowed_path,
    check_label_names,
)
from service.runtime import Backbone, Engine, EngineRequest, Kind, SamplingParams, StepPlan
from service.runtime.bias import verbalizer_tokens

from .batch import Batch, make_batch
from .data import Dataset, Example, load_dataset
from .methods import BuildContext, build_adapter, with_method_defaults
from .model import TaskModel

log = logging.getLogger(__name__)
_TABLED = (Family.LOW_RANK, Family.SCALING)  # families served from per-row tables held to the device budget
Progress = Callable[[dict[str, Any]], None]


class StopFlag(Protocol):
    """A threading.Event, or a multiprocessing one for runs in other processes."""

    def is_set(self) -> bool: ...


DEFAULT_STEPS = 200  # the budget of a spec that gives none of steps, epochs and max_time
CONVERGED_LOSS = 1e-4  # a window's mean training loss below this: nothing left to learn
LOSS_MARGIN = 0.98  # the guard: the last evaluation window's mean loss must be below this share of the first's
NOISE_SE = 2.0  # the guard: standard errors of the majority rate a validation accuracy must clear


class JobCancelled(Exception):
    """The job was cancelled while it trained: training stopped at the next step and nothing is published."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.stop = {"reason": "cancelled", "step": step}


@dataclass
class TrainResult:
    artifact: PrefixArtifact  # the best evaluation's version (training metadata inside)
    metrics: dict[str, float]  # its dev metrics, measured once at the end (its validation metrics without a dev set)
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)  # validation metrics at each evaluation
    passed_gate: bool = True
    degenerate: str | None = None  # why the run learned nothing worth serving, if it did not
    val_metrics: dict[str, float] = field(default_factory=dict)  # the best version's, what it was chosen on
    stop: dict[str, Any] = field(default_factory=dict)  # why and when training stopped, the best step and when
    guard: dict[str, Any] = field(default_factory=dict)  # the degeneracy guard's numbers


@dataclass(frozen=True)
class Budget:
    """When a run ends: the first of its limits reached (each None when not given).

    steps: optimizer steps (spec.steps); epoch_steps: the steps of spec.epochs passes over the train split;
    seconds: wall-clock of training, evaluations included (spec.max_time).
    """

    steps: int | None
    epoch_steps: int | None
    seconds: float | None

    @classmethod
    def of(cls, spec: TrainSpec, n_train: int) -> Budget:
        steps = spec.steps if spec.steps or spec.epochs or spec.max_time else DEFAULT_STEPS
        epoch_steps = None
        if spec.epochs is not None:  # each step takes grad_accum batches; an epoch's last batch may be short
            batches = math.ceil(n_train / spec.batch_size)
            epoch_steps = max(1, math.ceil(spec.epochs * batches / spec.grad_accum))
        return cls(steps, epoch_steps, spec.max_time)

    @property
    def max_steps(self) -> int | None:
        """The step limit (the nearer of steps and epochs), None for a budget in seconds only."""
        limits = [n for n in (self.steps, self.epoch_steps) if n is not None]
        return min(limits) if limits else None

    def reached(self, step: int, elapsed: float, reserve: float = 0.0) -> str | None:
        """The limit reached, or None. `reserve`: the seconds still to spend before the run could end (one more step
        and the closing evaluation): a time budget stops when they would no longer fit, so the run, its last
        evaluation included, ends within the budget rather than one step and one evaluation past it."""
        if self.steps is not None and step >= self.steps:
            return "max_steps"
        if self.epoch_steps is not None and step >= self.epoch_steps:
            return "epochs"
        if self.seconds is not None and elapsed + reserve >= self.seconds:
            return "max_time"
        return None

    def progress(self, step: int, elapsed: float) -> float:
        """How far the run is towards its nearest limit, in [0, 1]: what the learning-rate schedule follows."""
        done = [step / n for n in (self.steps, self.epoch_steps) if n]
        if self.seconds:
            done.append(elapsed / self.seconds)
        return min(1.0, max(done))


class Reserve:
    """What a time budget keeps back (Budget.reached's `reserve`): one more step and the closing evaluation, each the
    slowest of the recent ones. Batches pad to different lengths, so the last step alone can understate the next and
    a run would end a fraction of a second past its budget; the first step's one-off costs age out of the window."""

    def __init__(self, window: int = 10) -> None:
        self.steps: deque[float] = deque(maxlen=window)
        self.evals: deque[float] = deque(maxlen=window)

    @property
    def seconds(self) -> float:
        return max(self.steps, default=0.0) + max(self.evals, default=0.0)


def lr_factor(progress: float, warmup: float, schedule: str) -> float:
    """The learning rate's multiplier at `progress` (0..1 of the budget): linear warm-up over the first `warmup`,
    then linear or cosine decay to 0 at the end, or constant."""
    if progress < warmup:
        return progress / warmup
    if schedule == "constant":
        return 1.0
    rest = min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))
    return 1.0 - rest if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * rest))


def majority_noise(labels: Sequence[str | None]) -> tuple[float, float]:
    """(majority rate p, sampling noise): the share of the most frequent label and NOISE_SE standard errors of a
    binomial proportion at p over len(labels) examples, NOISE_SE * sqrt(p (1 - p) / n). An accuracy within the
    noise of p cannot be told from always answering that label."""
    counts: dict[str | None, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    n = len(labels)
    p = max(counts.values()) / n
    return p, NOISE_SE * math.sqrt(p * (1 - p) / n)


class Trainer:
    """Args:
    backbone: the frozen backbone, the same one the service runs.
    spec: the job.
    work_dir: checkpoints (`checkpoint.pt`, `best.safetensors`); a later run with the same dir resumes.
    progress: told {"step", "steps" (None for a budget in seconds only), "done" (0..1 of the nearest limit),
        "loss"} at each step, and "val" (the validation metrics) at each evaluation.
    data_dirs: the directories data may be read from (a queued job: PREFIXSERVE_TRAIN_DATA_DIRS), checked again
        here, in the process that reads, before anything is opened; images too. None: any path (the local command
        line, run by an operator with their own file permissions).
    stop: set from another thread to cancel: the loop raises JobCancelled at its next step (or evaluation chunk).
    """

    def __init__(
        self,
        backbone: Backbone,
        spec: TrainSpec,
        work_dir: str | Path | None = None,
        progress: Progress | None = None,
        *,
        data_dirs: Sequence[str] | None = None,
        stop: StopFlag | None = None,
    ) -> None:
        spec = with_method_defaults(spec)
        self.stop = stop
        if data_dirs is not None:  # read exactly the paths that were checked (symbolic links resolved)
            spec = spec.model_copy(
                update={
                    name: str(allowed_path(value, data_dirs, what=name, setting=TRAIN_DATA_SETTING))
                    for name in ("data", "dev_data")
                    if (value := getattr(spec, name)) is not None
                }
            )
        self.bb, self.spec = backbone, spec
        self.work_dir = Path(work_dir) if work_dir else None
        self.progress = progress or (lambda info: None)
        self.tok = backbone.tokenizer
        if self.tok is None and not backbone.is_image:
            raise ValueError("training needs the backbone's tokenizer")
        train_data = spec.examples or spec.data
        assert train_data is not None, "a TrainSpec has its data or its examples (its validator checks)"
        self.data: Dataset = load_dataset(
            train_data,
            spec.dev_examples or spec.dev_data,
            columns=spec.columns,
            dev_fraction=spec.dev_fraction,
            limit=spec.limit,
            dev_limit=spec.dev_limit,
            seed=spec.seed,
            val_fraction=spec.val_fraction,
            val_max=spec.val_max,
        )
        self._check_stop()
        if self.data.kind == "classification":  # what a served task will answer with: never raw file lines
            check_label_names(self.data.labels, "the data's labels")
        if backbone.is_image and data_dirs is not None:  # an image path (in a CSV, or inline) is opened later
            self._check_images(data_dirs)
        if self.data.kind == "generation" and backbone.is_encoder:
            raise ValueError(f"generation data needs a causal LM backbone; {backbone.name} is an encoder")
        method = REGISTRY[spec.method]
        if backbone.kind not in method.trains_on:
            kinds = ", ".join(sorted(k.value for k in method.trains_on))
            raise ValueError(
                f"method {spec.method} ({method.family.value}) trains on {kinds} backbones; {backbone.name} is "
                f"{backbone.kind.value}"
            )
        self._pixel_cache: dict[str, torch.Tensor] = {}
        self.labels = spec.labels or self.data.labels
        self.verbalizer: list[int] | None = None
        if spec.verbalizer is not None:
            self._check_verbalizer(backbone, spec)
            self.labels, self.verbalizer = verbalizer_tokens(self.tok, list(spec.verbalizer.items()))
        if self.data.kind == "classification" and set(self.data.labels) - set(self.labels):
            missing = len(set(self.data.labels) - set(self.labels))  # counted, not quoted: they are the file's
            raise ValueError(f"labels: {missing} of the data's {len(self.data.labels)} labels are not among them")
        torch.manual_seed(spec.seed)
        self.gen = torch.Generator().manual_seed(spec.seed)
        init_ids = None
        if spec.init_text and self.tok is not None:
            init_ids = self.tok(spec.init_text, add_special_tokens=False)["input_ids"]
        prefix = build_adapter(spec, BuildContext(backbone, self.gen, init_ids, self._training_tokens))
        n_labels = len(self.labels) if self.data.kind == "classification" else None
        pooling = spec.pooling or backbone.pooling
        if backbone.is_image and pooling != "cls":
            raise ValueError(f"pooling {pooling!r}: visual prompts train a head over [CLS] (pooling 'cls')")
        if n_labels and self.verbalizer is None and pooling not in backbone.poolings:
            raise ValueError(f"pooling {pooling!r} does not fit {backbone.name}: expected one of {backbone.poolings}")
        if spec.export_peft and method.peft_type is None:
            raise ValueError(f"export_peft: PEFT has no adapter type for {spec.method} ({method.family.value})")
        if n_labels and spec.export_peft and pooling not in ("pooler", "last_token"):
            raise ValueError(
                f"export_peft: a PEFT classification head reads the pooler or the last token; this head pools with "
                f"{pooling!r} (set pooling to 'pooler' to export it)"
            )
        model = TaskModel(
            backbone, spec.method, prefix.to(backbone.device), n_labels, pooling=pooling, verbalizer=self.verbalizer
        )
        self.model = model.to(backbone.device)
        # Evaluation: each round's artifact is a new version; the device cache keeps room for two. LoRA factors and
        # IA3 vectors count in the same budget, in per-row tables of a zero (or ones) row and a row per task, doubled
        # when full: four rows of the adapter's parameters hold two versions (the pool and tables grow only as used).
        fp = backbone.fingerprint
        prefix_bytes = 2 * fp.num_layers * fp.num_kv_heads * fp.head_dim * (spec.num_virtual_tokens or 0) * 4
        table_bytes = 4 * sum(p.numel() for p in prefix.parameters()) * 4 if method.family in _TABLED else 0
        self.engine = Engine(backbone, device_cache_bytes=2 * prefix_bytes + table_bytes + 2**20, max_rows=64)
        self.order: list[int] = []  # indices of the examples still to visit in this pass over the data

    def _check_images(self, data_dirs: Sequence[str]) -> None:
        """Every image path resolved inside `data_dirs` before any is opened. Counted, not named: a path from a CSV
        is the file's content."""
        paths = [ex.text for ex in self.data.train + self.data.val + self.data.dev]
        bad = 0
        for path in paths:
            try:
                allowed_path(path, data_dirs, what="image", setting=TRAIN_DATA_SETTING, quote=False)
            except JobPathError:
                bad += 1
        if bad:
            raise PathNotAllowed(
                f"the data: {bad} of its {len(paths)} images lie outside the directories this process allows, or are "
                f"not absolute paths ({TRAIN_DATA_SETTING})"
            )

    def _check_stop(self, step: int | None = None) -> None:
        if self.stop is not None and self.stop.is_set():
            raise JobCancelled(f"{self.spec.task}: cancelled" + ("" if step is None else f" at step {step}"), step)

    def _training_tokens(self, n: int) -> list[int]:
        """n tokens drawn (seeded) from the inputs of up to 64 random training examples, special tokens left out:
        real words of the task, at their frequency in it."""
        picked = torch.randperm(len(self.data.train), generator=self.gen)[:64].tolist()
        special = set(self.tok.all_special_ids)
        pool = [
            i
            for k in picked
            for i in self.tok(self.data.train[k].text, add_special_tokens=False)["input_ids"]
            if i not in special
        ]
        if not pool:
            raise ValueError("prefix_init 'activations': the training inputs have no tokens to start from")
        return [pool[j] for j in torch.randint(0, len(pool), (n,), generator=self.gen).tolist()]

    def _check_verbalizer(self, backbone: Backbone, spec: TrainSpec) -> None:
        if self.data.kind != "classification" or backbone.mask_token_id is None or backbone.mlm is None:
            raise ValueError("a verbalizer reads [MASK]: it needs classification data and an encoder with a mask token")
        mask = self.tok.mask_token
        if spec.template is None or mask not in spec.template:
            raise ValueError(f"a verbalizer reads the mask token: give a template with it, e.g. '{{text}} {mask}'")
        missing = set(self.data.labels) - set(spec.verbalizer or {})
        if missing:
            raise ValueError(f"verbalizer: no word for {len(missing)} of the data's {len(self.data.labels)} labels")

    # -- batches ------------------------------------------------------------------------------------------------
    def _encode(self, ex: Example) -> tuple[list[int], list[int] | None, list[int] | None]:
        """(ids, labels, token types) of one example, truncated to max_length (a templated input loses words of
        its text, so the template's own tokens, [MASK] included, always stay)."""
        L = self.spec.max_length
        if self.data.kind == "classification":
            text, pair = ex.text, ex.text_pair
            for _ in range(8):
                enc = self._classification_tokens(text, pair, truncate=self.spec.template is None)
                if len(enc["input_ids"]) <= L:
                    break
                words = text.split()  # cut the text in proportion to the excess and try again
                text = " ".join(words[: max(0, len(words) * L // len(enc["input_ids"]) - 1)])
            ids = enc["input_ids"][:L]
            if self.verbalizer is not None and self.bb.mask_token_id not in ids:
                raise ValueError(
                    f"an example ({len(ex.text)} characters) does not fit max_length {L} with its template's mask "
                    "token: raise max_length or shorten the template"
                )
            return ids, None, (enc.get("token_type_ids") or [])[:L] or None
        prompt = self.tok(ex.text, truncation=True, max_length=L)["input_ids"]
        target = self.tok(" " + (ex.target or ""), add_special_tokens=False)["input_ids"][:L]
        if self.tok.eos_token_id is not None:
            target = target + [self.tok.eos_token_id]
        return prompt + target, [-100] * len(prompt) + target, None

    def _classification_tokens(self, text: str, pair: str | None, truncate: bool) -> dict[str, Any]:
        text, pair = render_template(self.spec.template, text, pair)
        kw: dict[str, Any] = {"truncation": True, "max_length": self.spec.max_length} if truncate else {}
        return self.tok(text, pair, **kw) if pair else self.tok(text, **kw)

    def _pixels(self, ex: Example) -> torch.Tensor:
        """An image example's pixel values (C, H, W), prepared by the backbone's image processor (cached)."""
        px = self._pixel_cache.get(ex.text)
        if px is None:
            from PIL import Image

            try:
                with Image.open(ex.text) as img:
                    rgb = img.convert("RGB")
            except (OSError, SyntaxError) as e:  # not named: its path may come from a CSV, which is file content
                raise ValueError(f"an image of the data cannot be read as an image ({type(e).__name__})") from None
            px = self.bb.image_processor(images=[rgb], return_tensors="pt")["pixel_values"][0]
            self._pixel_cache[ex.text] = px
        return px

    def _batch(self, examples: list[Example]) -> Batch:
        if self.bb.is_image:
            B, dev = len(examples), self.bb.device
            return Batch(
                ids=torch.zeros(B, 1, dtype=torch.long, device=dev),
                mask=torch.ones(B, 1, dtype=torch.bool, device=dev),
                lengths=[1] * B,
                classes=torch.tensor(self._class_ids(examples), device=dev),
                pixels=torch.stack([self._pixels(e) for e in examples]).to(dev),
            )
        enc = [self._encode(e) for e in examples]
        pad = self.tok.pad_token_id or 0
        if self.data.kind == "classification":
            types = [t or [] for _, _, t in enc] if self.bb.is_encoder and enc[0][2] is not None else None
            return make_batch(
                [i for i, _, _ in enc], self.bb.device, pad, types=types, classes=self._class_ids(examples)
            )
        return make_batch([i for i, _, _ in enc], self.bb.device, pad, labels=[lab for _, lab, _ in enc])

    def _class_ids(self, examples: list[Example]) -> list[int]:
        """Each classification example's label index in the head (data.py gives every such example a label)."""
        labels = [e.label for e in examples]
        if None in labels:
            raise ValueError("a classification example without a label")
        return [self.labels.index(str(label)) for label in labels]

    def _epoch_order(self) -> list[int]:
        """One pass over the training data, batched by similar length: a seeded shuffle cut into pools of 50
        batches, each pool sorted by length and cut into batches, the batches shuffled. A batch pads to its longest
        example, so this spends the compute on tokens rather than padding (SST-2's sentences run from 2 to 60
        tokens), while every batch still draws from a random sample of the data."""
        n, bs = len(self.data.train), self.spec.batch_size
        order = torch.randperm(n, generator=self.gen).tolist()
        lengths = self._lengths()
        batches: list[list[int]] = []
        pool = 50 * bs
        for start in range(0, n, pool):
            chunk = sorted(order[start : start + pool], key=lengths.__getitem__)
            batches += [chunk[i : i + bs] for i in range(0, len(chunk), bs)]
        full = [b for b in batches if len(b) == bs]
        short = [i for b in batches if len(b) < bs for i in b]  # the pools' remainders: one last, smaller batch
        shuffled = torch.randperm(len(full), generator=self.gen).tolist()
        return [i for b in shuffled for i in full[b]] + short

    def _lengths(self) -> list[int]:
        if not hasattr(self, "_length_cache"):
            if self.bb.is_image:  # every image is the same length
                self._length_cache = [0] * len(self.data.train)
            else:
                self._length_cache = [len(self._encode(e)[0]) for e in self.data.train]
        return self._length_cache

    # -- the loop -----------------------------------------------------------------------------------------------
    @property
    def budget(self) -> Budget:
        return Budget.of(self.spec, len(self.data.train))

    def run(self) -> TrainResult:
        spec, model, budget = self.spec, self.model, self.budget
        params = model.trainable()
        opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
        state: dict[str, Any] = {
            "step": 0,
            "best": -math.inf,
            "bad_evals": 0,
            "history": [],
            "loss_avg": None,
            "elapsed": 0.0,  # seconds trained so far, earlier runs of a resumed job included
            "best_step": 0,
            "best_s": 0.0,
            "window": [],  # the raw training losses since the last evaluation
        }
        self._resume(opt, state)
        started = time.monotonic() - state["elapsed"]
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.bb.device.type == "cuda" else nullcontext()
        bar = tqdm(total=budget.max_steps, initial=state["step"], desc=f"train {spec.task}", disable=None)
        loss_avg = state["loss_avg"]
        reason = budget.reached(state["step"], state["elapsed"]) or self._early_stop(state)
        reserve = Reserve()
        while reason is None:
            model.train()
            self.bb.model.train()  # frozen weights, but dropout on, as in P-Tuning v2
            self._check_stop(state["step"])
            factor = lr_factor(
                budget.progress(state["step"], state["elapsed"]), spec.warmup_ratio or 0.0, spec.lr_schedule
            )
            for group in opt.param_groups:
                group["lr"] = spec.lr * factor
            opt.zero_grad(set_to_none=True)
            for _ in range(spec.grad_accum):
                if not self.order:
                    self.order = self._epoch_order()
                idx, self.order = self.order[: spec.batch_size], self.order[spec.batch_size :]
                with autocast:
                    loss = model.loss(self._batch([self.data.train[i] for i in idx])) / spec.grad_accum
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            state["step"] += 1
            now = time.monotonic() - started
            reserve.steps.append(now - state["elapsed"])
            state["elapsed"] = now
            value = loss.item() * spec.grad_accum
            state["window"].append(value)
            loss_avg = state["loss_avg"] = value if loss_avg is None else 0.9 * loss_avg + 0.1 * value
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.4f}")
            done = budget.progress(state["step"], state["elapsed"])  # of the nearest limit: a time budget has no steps
            self.progress({"step": state["step"], "steps": budget.max_steps, "done": round(done, 4), "loss": loss_avg})
            reason = budget.reached(state["step"], state["elapsed"], reserve.seconds)
            if self.data.val and (state["step"] % spec.eval_every == 0 or reason):
                self._evaluate_and_keep(state, loss_avg)
                now = time.monotonic() - started
                reserve.evals.append(now - state["elapsed"])
                state["elapsed"] = now
                reason = (
                    reason
                    or self._early_stop(state)
                    or budget.reached(state["step"], state["elapsed"], reserve.seconds)
                )
            if state["step"] % spec.checkpoint_every == 0:
                self._checkpoint(opt, state)
        bar.close()
        self.bb.model.eval()
        if not self.data.val:  # nothing to choose on: the last version is the run's
            state["best_step"], state["best_s"] = state["step"], state["elapsed"]
            self._best = self._artifact({"step": state["step"]})
        elif not state["history"]:  # resumed after the last evaluation
            self._evaluate_and_keep(state, loss_avg)
        return self._finish(state, reason or "max_steps", time.monotonic() - started)

    def _early_stop(self, state: dict[str, Any]) -> str | None:
        """ "converged" when there is nothing left to gain (the validation accuracy is perfect, or the last window's
        training loss is below CONVERGED_LOSS), "patience" after `patience` evaluations without improvement."""
        history = state["history"]
        if history and (
            (self.metric_name == "accuracy" and state["best"] >= 1.0)
            or history[-1].get("window_loss", math.inf) < CONVERGED_LOSS
        ):
            return "converged"
        return "patience" if state["bad_evals"] >= self.spec.patience else None

    def _finish(self, state: dict[str, Any], reason: str, seconds: float) -> TrainResult:
        """The best version, scored once on dev, its guard and gate, and why the run stopped."""
        spec = self.spec
        best = self._best_artifact()
        val_metrics = best.training.get("val_metrics", {})
        metrics = self.evaluate(best) if self.data.dev else dict(val_metrics)
        if not val_metrics:  # no validation split: the guard reads the dev set
            val_metrics = metrics
        stop = {
            "reason": reason,
            "step": state["step"],
            "seconds": round(seconds, 1),
            "metric": self.metric_name,
            "best_val": val_metrics.get(self.metric_name),
            "best_step": state["best_step"],
            "best_seconds": round(state["best_s"], 1),
        }
        passed = spec.gate is None or metrics.get(self.metric_name, -math.inf) >= spec.gate
        degenerate, guard = self.degenerate(val_metrics, state["history"])
        best.training.update(metrics=metrics, val_metrics=val_metrics, stop=stop, guard=guard)
        if degenerate:
            log.warning("%s: %s", spec.task, degenerate)
            best.training["degenerate"] = degenerate
        log.info(
            "%s: stopped (%s) at step %d; best validation at step %d",
            spec.task,
            reason,
            state["step"],
            state["best_step"],
        )
        return TrainResult(best, metrics, state["step"], state["history"], passed, degenerate, val_metrics, stop, guard)

    def degenerate(self, metrics: dict[str, float], history: list[dict[str, Any]]) -> tuple[str | None, dict[str, Any]]:
        """(why the run learned nothing worth serving or None, the numbers). Classification: its best validation
        accuracy must beat the validation split's majority-class rate by more than the sampling noise of that split
        (majority_noise): a rise inside it is luck of the draw. Any run: its training loss must fall, the last
        evaluation window's mean below LOSS_MARGIN of the first's."""
        numbers: dict[str, Any] = {}
        judged = self.data.val or self.data.dev
        if self.data.kind == "classification" and judged:
            majority, noise = majority_noise([ex.label for ex in judged])
            acc = metrics.get("accuracy", 0.0)
            numbers.update(metric=acc, majority=majority, noise=noise, n=len(judged))
            if acc <= majority + noise:
                return (
                    f"best validation accuracy {acc:.4f} does not beat the majority-class baseline {majority:.4f} "
                    f"(always answering the most frequent label) by more than the sampling noise {noise:.4f} "
                    f"({NOISE_SE:g} standard errors at n={len(judged)})"
                ), numbers
        losses = [h.get("window_loss", h.get("train_loss", math.nan)) for h in history]
        losses = [x for x in losses if math.isfinite(x)]
        if len(losses) >= 2:
            numbers.update(first_loss=losses[0], last_loss=losses[-1])
            if losses[-1] >= LOSS_MARGIN * losses[0]:
                return (
                    f"training loss did not fall: {losses[0]:.4f} over the first evaluation window, {losses[-1]:.4f} "
                    "over the last"
                ), numbers
        return None, numbers

    @property
    def metric_name(self) -> str:
        return "accuracy" if self.data.kind == "classification" else "bleu"

    def _evaluate_and_keep(self, state: dict[str, Any], loss: float | None) -> None:
        """Scores the current version on the validation split; the best so far (by more than min_delta) is kept."""
        art = self._artifact({})
        metrics = self.evaluate(art, examples=self.data.val)
        window = state["window"]
        metrics["train_loss"] = loss if loss is not None else float("nan")
        metrics["window_loss"] = sum(window) / len(window) if window else float("nan")
        state["window"] = []
        state["history"].append({"step": state["step"], **metrics})
        log.info("step %d: %s", state["step"], metrics)
        self.progress({"step": state["step"], "steps": self.budget.max_steps, "loss": loss, "val": metrics})
        score = metrics[self.metric_name]
        if score > state["best"] + self.spec.min_delta:
            state["best"], state["bad_evals"] = score, 0
            state["best_step"], state["best_s"] = state["step"], state["elapsed"]
            val = {k: v for k, v in metrics.items() if k not in ("train_loss", "window_loss")}
            self._best = self._artifact({"val_metrics": val, "step": state["step"]})
            if self.work_dir:
                self.work_dir.mkdir(parents=True, exist_ok=True)
                (self.work_dir / "best.safetensors").write_bytes(encode(self._best))
        else:
            state["bad_evals"] += 1

    def _best_artifact(self) -> PrefixArtifact:
        best = getattr(self, "_best", None)
        if best is None and self.work_dir and (self.work_dir / "best.safetensors").exists():
            best = decode((self.work_dir / "best.safetensors").read_bytes())
        assert best is not None, "an evaluation always runs before the end"
        return best

    def _artifact(self, extra: dict[str, Any]) -> PrefixArtifact:
        s = self.spec
        training = {
            "dataset": s.data or "inline",
            "dev": s.dev_data or ("inline" if s.dev_examples else "held out"),
            "train_examples": len(self.data.train),
            "val_examples": len(self.data.val),
            "dev_examples": len(self.data.dev),
            "steps": s.steps,
            "epochs": s.epochs,
            "max_time": s.max_time,
            "lr_schedule": s.lr_schedule,
            "batch_size": s.batch_size,
            "grad_accum": s.grad_accum,
            "lr": s.lr,
            "seed": s.seed,
            "reparam": s.reparam,
            "metric": self.metric_name,
            **extra,
        }
        labels = self.labels if self.data.kind == "classification" else None
        art = self.model.artifact(s.task, labels, training, template=s.template)
        art.created_at = datetime.now(UTC).isoformat(timespec="seconds")
        return art

    # -- evaluation through the serving engine ------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, art: PrefixArtifact, examples: list[Example] | None = None) -> dict[str, float]:
        """The artifact's metrics on `examples` (default: the dev set), served by the engine."""
        self.bb.model.eval()
        self._evaluations = getattr(self, "_evaluations", 0) + 1
        art.version = self._evaluations  # the engine caches by (task, version): a fresh number per evaluation
        dev = self.data.dev if examples is None else examples
        if self.data.kind == "classification":
            correct = 0
            for start in range(0, len(dev), 64):
                self._check_stop()
                chunk = dev[start : start + 64]
                reqs = []
                for i, ex in enumerate(chunk):
                    if self.bb.is_image:
                        px = self._pixels(ex)
                        reqs.append(EngineRequest(f"eval-{start + i}", Kind.CLASSIFY, [], art, pixel_values=px))
                        continue
                    ids, _, types = self._encode(ex)
                    reqs.append(
                        EngineRequest.classify(f"eval-{start + i}", ids, art, types if self.bb.is_encoder else None)
                    )
                events = {out.request_id: out for out in self.engine.step(StepPlan(tuple(reqs))).rows}
                for i, ex in enumerate(chunk):
                    probs = events[f"eval-{start + i}"].probs or []
                    correct += self.labels[max(range(len(probs)), key=probs.__getitem__)] == ex.label
            return {"accuracy": correct / max(1, len(dev))}
        return self._generation_metrics(art, dev)

    def _generation_metrics(self, art: PrefixArtifact, dev: list[Example]) -> dict[str, float]:
        import sacrebleu
        from rouge_score import rouge_scorer

        refs: dict[str, list[str]] = {}
        for ex in dev:  # E2E: one meaning representation, several references
            refs.setdefault(ex.text, []).append(ex.target or "")
        inputs = list(refs)
        params = SamplingParams(max_new_tokens=self.spec.max_new_tokens)
        outputs: dict[str, list[int]] = {}
        for start in range(0, len(inputs), 32):
            self._check_stop()
            reqs = [
                EngineRequest.generate(
                    f"gen-{start + i}",
                    self.tok(x, truncation=True, max_length=self.spec.max_length)["input_ids"],
                    art,
                    params,
                )
                for i, x in enumerate(inputs[start : start + 32])
            ]
            events = self.engine.step(StepPlan(tuple(reqs))).rows
            while True:
                for ev in events:
                    if ev.token_id is not None:
                        outputs.setdefault(ev.request_id, []).append(ev.token_id)
                if not self.engine.running:
                    break
                events = self.engine.step(StepPlan()).rows
        hyps = [
            self.tok.decode(
                _until_eos(outputs.get(f"gen-{i}", []), self.tok.eos_token_id), skip_special_tokens=True
            ).strip()
            for i in range(len(inputs))
        ]
        n_refs = max(len(r) for r in refs.values())
        ref_streams = [[refs[x][k] if k < len(refs[x]) else refs[x][0] for x in inputs] for k in range(n_refs)]
        bleu = sacrebleu.corpus_bleu(hyps, ref_streams).score
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        rouge = sum(
            max(scorer.score(r, h)["rougeL"].fmeasure for r in refs[x]) for x, h in zip(inputs, hyps, strict=True)
        )
        return {"bleu": bleu, "rougeL": rouge / max(1, len(inputs))}

    # -- checkpoints --------------------------------------------------------------------------------------------
    def _checkpoint(self, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if not self.work_dir:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.work_dir / "checkpoint.pt.tmp"
        trained = {k: v for k, v in self.model.state_dict().items() if k.startswith(("prefix.", "head."))}
        torch.save(
            {
                "model": trained,
                "opt": opt.state_dict(),
                "gen": self.gen.get_state(),
                "order": torch.tensor(self.order, dtype=torch.long),
                "torch_rng": torch.get_rng_state(),
                "step": state["step"],
                "best": state["best"],
                "bad_evals": state["bad_evals"],
                "history": _jsonable(state["history"]),
                "loss_avg": state["loss_avg"],
                "elapsed": state["elapsed"],
                "best_step": state["best_step"],
                "best_s": state["best_s"],
                "window": list(state["window"]),
            },
            tmp,
        )
        tmp.replace(self.work_dir / "checkpoint.pt")  # atomic: a crash never leaves half a checkpoint

    def _resume(self, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        path = self.work_dir / "checkpoint.pt" if self.work_dir else None
        if path is None or not path.exists():
            return
        ck = torch.load(path, map_location=self.bb.device, weights_only=True)  # our own file, tensors only
        self.model.load_state_dict(ck["model"], strict=False)
        opt.load_state_dict(ck["opt"])  # the learning rate is set afresh at every step from the budget's progress
        self.gen.set_state(ck["gen"])
        self.order = ck["order"].tolist()
        torch.set_rng_state(ck["torch_rng"])
        state.update(
            step=ck["step"], best=ck["best"], bad_evals=ck["bad_evals"], history=ck["history"], loss_avg=ck["loss_avg"]
        )
        for key in ("elapsed", "best_step", "best_s", "window"):  # absent from checkpoints of older versions
            if key in ck:
                state[key] = ck[key]
        log.info("resumed %s at step %d", self.spec.task, state["step"])


def _until_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[: ids.index(eos)] if eos is not None and eos in ids else ids


def _jsonable(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: float(v) if isinstance(v, float) else v for k, v in h.items()} for h in history]


def train(
    backbone: Backbone,
    spec: TrainSpec,
    work_dir: str | Path | None = None,
    progress: Progress | None = None,
    *,
    data_dirs: Sequence[str] | None = None,
    stop: StopFlag | None = None,
) -> TrainResult:
    """Trains one run (see Trainer for `data_dirs` and `stop`)."""
    start = time.monotonic()
    result = Trainer(backbone, spec, work_dir, progress, data_dirs=data_dirs, stop=stop).run()
    result.artifact.training["train_seconds"] = round(time.monotonic() - start, 1)
    return result
