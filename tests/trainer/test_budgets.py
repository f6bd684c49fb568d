"""Issue 30: budgets in steps, epochs and seconds, early stopping on a validation split carved from the training data
(never dev) with the best version kept, stop reasons in the job result, and a degeneracy guard that knows the
sampling noise of its validation split. Tiny backbones, real (tiny) data."""

import contextlib
import io
import math
import re

import pytest
import torch
from pydantic import ValidationError

from prefix_store.jobs import TrainSpec
from service.runtime import wrap_model
from tests.models import tiny_model, tiny_tokenizer
from trainer.__main__ import main as cli
from trainer.data import Example, carve_validation, load_dataset
from trainer.settings import TrainerSettings
from trainer.sweep import configs
from trainer.train import Budget, Reserve, Trainer, lr_factor, majority_noise
from trainer.worker import run_job

# Separable: the first word says the label. Random: the label is a seeded coin flip, unrelated to the text.
EASY = [  # every text distinct (i % 8 and i // 8 give i)
    {"text": f"w{3 + i % 20} w{30 + i % 8} w{40 + i // 8}", "label": "pos" if i % 20 < 10 else "neg"}
    for i in range(160)
]
_COIN = torch.Generator().manual_seed(7)
RANDOM = [
    {"text": f"w{3 + i % 40} w{50 + i % 13}", "label": "ab"[int(b)]}
    for i, b in enumerate(torch.randint(0, 2, (200,), generator=_COIN).tolist())
]


def _bert():
    return wrap_model(tiny_model("bert-cls").bert, tiny_tokenizer(), name="tiny-bert")


def _spec(**kw) -> TrainSpec:
    base = dict(task="b", method="p_tuning_v2", examples=EASY, batch_size=8, lr=1e-2, num_virtual_tokens=3)
    return TrainSpec(**{**base, **kw})


# -- budgets -----------------------------------------------------------------------------------------------------
def test_budget_stops_at_the_first_limit_reached():
    b = Budget(steps=10, epoch_steps=7, seconds=100.0)
    assert b.max_steps == 7
    assert [b.reached(6, 1.0), b.reached(7, 1.0), b.reached(3, 100.0)] == [None, "epochs", "max_time"]
    assert Budget(10, None, None).reached(10, 1e9) == "max_steps"  # no time limit given: none applies
    # a time budget keeps room for one more step and the closing evaluation: it stops when they would not fit
    assert [Budget(None, None, 10.0).reached(5, 7.0, r) for r in (2.9, 3.0)] == [None, "max_time"]
    assert Budget(None, None, 50.0).progress(0, 25.0) == 0.5  # a budget in seconds: the schedule follows time
    assert Budget(100, None, 50.0).progress(10, 25.0) == 0.5  # the nearer limit sets the pace


def test_reserve_keeps_back_the_slowest_recent_step_and_evaluation():
    r = Reserve(window=3)
    assert r.seconds == 0.0  # nothing measured yet: nothing kept back
    for s in (5.0, 1.0, 2.0):  # a slow first step (one-off costs), then short and long batches
        r.steps.append(s)
    r.evals.append(4.0)
    assert r.seconds == 5.0 + 4.0  # the slowest, not the last (2.0): a longer batch may come next
    r.steps.append(1.5)
    assert r.seconds == 2.0 + 4.0  # the first step's one-off cost has aged out of the window
    wrong = Reserve(window=1)  # negative control: the last step alone understates a longer one still to come
    for s in (1.0, 2.0, 1.0):
        wrong.steps.append(s)
    assert wrong.seconds < 2.0


def test_budget_of_a_spec():
    assert Budget.of(_spec(), 100) == Budget(200, None, None)  # nothing given: the default 200 steps
    assert Budget.of(_spec(epochs=2), 100) == Budget(None, 26, None)  # ceil(100 / 8) = 13 batches a pass
    assert Budget.of(_spec(epochs=2, grad_accum=2), 100).epoch_steps == 13
    assert Budget.of(_spec(max_time=30), 100) == Budget(None, None, 30)


@pytest.mark.parametrize(
    "progress, schedule, expected",
    [
        (0.0, "linear", 0.0),
        (0.05, "linear", 0.5),  # half-way through a warm-up of 0.1
        (0.1, "linear", 1.0),
        (0.55, "linear", 0.5),
        (1.0, "linear", 0.0),
        (0.55, "cosine", 0.5),
        (0.325, "cosine", 0.5 * (1 + math.cos(math.pi / 4))),
        (1.0, "cosine", 0.0),
        (0.9, "constant", 1.0),
    ],
)
def test_lr_schedules(progress, schedule, expected):
    assert lr_factor(progress, 0.1, schedule) == pytest.approx(expected)


def test_spec_bounds():
    for bad in ({"epochs": 0}, {"max_time": -1}, {"val_fraction": 1.0}, {"val_max": 0}, {"lr_schedule": "step"}):
        with pytest.raises(ValidationError):
            _spec(**bad)
    with pytest.raises(ValidationError, match="at most 64 runs"):
        _spec(
            sweep={
                "lrs": [1e-3, 1e-2, 1e-1],
                "num_virtual_tokens": [2, 4, 8, 16],
                "pooling": ["cls", "mean"],
                "reparam": [True, False],
                "prefix_init": ["random", "activations"],
            }
        )


def test_epochs_stop_the_run():
    trainer = Trainer(_bert(), _spec(epochs=0.5, eval_every=1000, val_fraction=0.1))
    result = trainer.run()
    per_epoch = math.ceil(len(trainer.data.train) / 8)
    assert result.steps == math.ceil(0.5 * per_epoch) and result.stop["reason"] == "epochs"
    assert result.history[-1]["step"] == result.steps  # the run's end is evaluated, whatever the cadence


def test_max_time_stops_the_run():
    seen: list[dict] = []
    trainer = Trainer(_bert(), _spec(max_time=1.5, eval_every=1000, lr_schedule="cosine"), progress=seen.append)
    result = trainer.run()
    assert result.stop["reason"] == "max_time" and result.steps > 1
    # it ends inside the budget, closing evaluation included (a step's jitter aside), rather than a step past it
    assert result.stop["seconds"] <= 1.5 + 0.5
    steps = [p for p in seen if "val" not in p]  # the per-step reports (an evaluation reports "val")
    assert all(p["steps"] is None for p in steps), "a budget in seconds has no step count"
    done = [p["done"] for p in steps]  # the share of the time budget: what a progress bar shows
    # the last report is one step and the closing evaluation short of the whole budget (on a loaded core a step of
    # this tiny model can take a third of it)
    assert done == sorted(done) and 0 < done[0] < done[-1] <= 1 and done[-1] >= 0.5


def test_steps_win_when_nearer():
    result = Trainer(_bert(), _spec(steps=5, epochs=50, max_time=3600, eval_every=1000)).run()
    assert (result.steps, result.stop["reason"]) == (5, "max_steps")


# -- the validation split ----------------------------------------------------------------------------------------
def test_validation_is_carved_from_train_stratified_and_disjoint_from_dev():
    train = [{"text": f"t{i}", "label": "a" if i % 10 < 7 else "b"} for i in range(300)]
    dev = [{"text": f"d{i}", "label": "a" if i % 2 else "b"} for i in range(40)]
    data = load_dataset(train, dev, val_fraction=0.1, val_max=1000, seed=3)
    val, fit = {e.text for e in data.val}, {e.text for e in data.train}
    assert len(val) == 30 and len(fit) == 270 and not val & fit and not val & {e.text for e in data.dev}
    assert sum(e.label == "a" for e in data.val) == 21  # 70% as in train
    assert data.dev == [Example(d["text"], label=d["label"]) for d in dev]  # dev untouched
    assert len(load_dataset(train, dev, val_fraction=0.5, val_max=25).val) == 25  # capped
    assert {e.text for e in load_dataset(train, dev, val_fraction=0.1, seed=4).val} != val  # seeded
    assert load_dataset(train, dev, val_fraction=0.1, seed=3).val == data.val


def test_generation_validation_holds_out_whole_inputs():
    rows = [Example(f"mr{i % 30}", target=f"ref{i}") for i in range(120)]  # 4 references per input
    train, val = carve_validation(rows, "generation", 0.1, None, 0)
    assert val and not {e.text for e in val} & {e.text for e in train}


def test_trainer_selects_on_validation_and_reports_dev_once():
    dev = [{"text": f"w{3 + i % 20} w9", "label": "pos" if i % 20 < 10 else "neg"} for i in range(30)]
    seen: list[int] = []
    trainer = Trainer(_bert(), _spec(dev_examples=dev, steps=6, eval_every=3, lr=1e-4))  # far from converging
    evaluate = trainer.evaluate

    def counting(art, examples=None):
        seen.append(len(trainer.data.dev if examples is None else examples))
        return evaluate(art, examples)

    trainer.evaluate = counting
    result = trainer.run()
    n_val = len(trainer.data.val)
    assert n_val == 16 and seen == [n_val, n_val, 30]  # two validation rounds, then dev once
    assert not {e.text for e in trainer.data.val} & {e.text for e in trainer.data.train}
    assert result.artifact.training["val_examples"] == n_val and result.artifact.training["dev_examples"] == 30
    assert set(result.metrics) == {"accuracy"} and result.val_metrics == result.artifact.training["val_metrics"]


# -- early stopping keeps the best version -------------------------------------------------------------------------
@pytest.mark.slow  # about 10 s: trains until patience runs out
def test_early_stopping_publishes_the_best_step_not_the_last():
    bb = _bert()
    snapshots: dict[int, torch.Tensor] = {}
    holder: list[Trainer] = []

    def progress(info):
        if "val" in info:  # an evaluation: what the adapter is at that step
            snapshots[info["step"]] = holder[0].model.prefix.kv.detach().clone()

    spec = _spec(examples=RANDOM, steps=400, eval_every=2, patience=2, lr=5e-2, lr_schedule="constant")
    holder.append(Trainer(bb, spec, progress=progress))
    result = holder[0].run()
    stop = result.stop
    assert stop["reason"] == "patience" and stop["best_step"] == stop["step"] - 4, stop
    assert result.artifact.training["step"] == stop["best_step"]
    assert stop["best_val"] == max(h["accuracy"] for h in result.history)
    assert torch.equal(result.artifact.kv, snapshots[stop["best_step"]])
    assert not torch.equal(result.artifact.kv, snapshots[stop["step"]])


# -- the degeneracy guard ----------------------------------------------------------------------------------------
def test_majority_noise_is_two_standard_errors():
    p, noise = majority_noise(["a"] * 146 + ["b"] * 131)  # the entailment dev: 277, majority 52.7%
    assert p == pytest.approx(0.5271, abs=1e-4) and noise == pytest.approx(2 * math.sqrt(p * (1 - p) / 277))
    assert 0.059 < noise < 0.061


def test_two_points_above_majority_on_277_is_degenerate():
    trainer = Trainer(_bert(), _spec(steps=1))
    trainer.data.val = [Example(f"w{i}", label="pos" if i < 146 else "neg") for i in range(277)]
    falling = [{"step": 1, "window_loss": 0.69}, {"step": 2, "window_loss": 0.40}]
    why, numbers = trainer.degenerate({"accuracy": 0.5271 + 0.02}, falling)
    assert "sampling noise 0.06" in why and "n=277" in why and numbers["n"] == 277
    assert numbers["majority"] == pytest.approx(146 / 277) and numbers["noise"] == pytest.approx(0.06, abs=1e-3)
    assert trainer.degenerate({"accuracy": 0.5271 + 0.07}, falling)[0] is None  # beyond the noise
    flat = [{"step": 1, "window_loss": 0.69}, {"step": 2, "window_loss": 0.685}]
    assert "loss did not fall" in trainer.degenerate({"accuracy": 0.70}, flat)[0]


@pytest.mark.redis
async def test_random_labels_are_degenerate_and_a_separable_task_is_not(store, tmp_path):
    settings = TrainerSettings(work_dir=tmp_path / "work")
    noise = _spec(examples=RANDOM, steps=40, eval_every=10, patience=100)
    result = await run_job(_bert(), store, noise, settings, "job-random")
    assert not result["published"] and "sampling noise" in result["degenerate"]
    guard = result["guard"]
    assert 15 <= guard["n"] <= 20 and guard["metric"] <= guard["majority"] + guard["noise"]
    easy = _spec(steps=60, eval_every=10, lr=5e-2)
    result = await run_job(_bert(), store, easy, settings, "job-easy")
    assert result["published"] and "degenerate" not in result, result.get("degenerate")
    stop = result["stop"]
    assert (
        stop["reason"] in ("converged", "max_steps", "patience")
        and stop["best_val"] == result["val_metrics"]["accuracy"]
    )
    assert {"step", "seconds", "best_step", "best_seconds", "metric"} <= set(stop)
    assert result["guard"]["metric"] > result["guard"]["majority"] + result["guard"]["noise"]


# -- the levers ----------------------------------------------------------------------------------------------------
def test_sweep_grid_covers_reparam_pooling_and_prefix_init():
    runs = configs(_spec(sweep={"reparam": [False, True], "pooling": ["cls", "mean"], "prefix_init": ["random"]}))
    assert [(r.reparam, r.pooling, r.prefix_init) for r in runs] == [
        (False, "cls", "random"),
        (False, "mean", "random"),
        (True, "cls", "random"),
        (True, "mean", "random"),
    ]


def test_prefix_tuning_starts_from_real_tokens_or_random():
    bb = _bert()
    table = bb.embeddings.weight
    real = Trainer(bb, _spec(method="prefix_tuning", prefix_init="activations")).model.prefix.embedding.weight
    assert all(any(torch.equal(row, t) for t in table) for row in real)  # each row a real token's embedding
    rand = Trainer(bb, _spec(method="prefix_tuning")).model.prefix.embedding.weight  # its default: random
    assert not any(torch.equal(rand[0], t) for t in table)


# -- the command line ----------------------------------------------------------------------------------------------
def test_help_shows_every_default():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli(["train", "--help"])
    blocks = re.split(r"\n  (?=--)", out.getvalue().split("options:", 1)[1])[1:]
    flags = {b.split()[0]: " ".join(b.split()) for b in blocks if b.split()[0] != "--help"}
    assert {"--epochs", "--max-time", "--val-fraction", "--lr-schedule", "--min-delta"} <= set(flags)
    missing = [f for f, text in flags.items() if not re.search(r"default|required", text, re.I)]
    assert not missing, missing
