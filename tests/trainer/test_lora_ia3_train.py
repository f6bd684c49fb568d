"""Training LoRA and IA3: a few steps lower the loss; the trained artifact, served by the engine and exported to
PEFT, gives the trainer's own forward's logits (fp32, <= 1e-5) on a decoder (Llama), GPT-2 (its fused c_attn, a
Conv1D) and an encoder with a head; the target options; and a queued job's sweep over both, published and exported."""

import copy
from argparse import Namespace

import pytest
import torch
from peft import PeftModel

from prefix_store import export_peft_adapter
from prefix_store.jobs import TrainSpec
from service.runtime import SamplingParams, wrap_model
from tests.engine_harness import serving_stack
from tests.models import tiny_model, tiny_tokenizer
from trainer.__main__ import _spec_from
from trainer.batch import make_batch
from trainer.methods import low_rank, scaling
from trainer.settings import TrainerSettings
from trainer.train import Trainer
from trainer.worker import run_job

GEN = [{"input": f"w{3 + i % 20} w{5 + i % 7}", "output": f"w{10 + i % 20} w{40 + i % 7} w9"} for i in range(120)]
CLS = [{"text": f"w{3 + i % 20} w{5 + i % 7}", "label": "pos" if i % 20 < 10 else "neg"} for i in range(120)]
IDS = [5, 17, 33, 9]


def spec(method, examples, **kw):
    base = dict(task="t", method=method, examples=examples, steps=12, eval_every=12, batch_size=8, max_new_tokens=4)
    return TrainSpec(**{**base, **kw})


def backbone(kind):
    model = tiny_model("bert-cls").bert if kind == "bert" else tiny_model(kind)
    return wrap_model(model, tiny_tokenizer(), name="t")


def fixed_loss(run: Trainer) -> float:
    """The task model's loss on a fixed batch, dropout off."""
    run.model.eval()
    run.bb.model.eval()
    with torch.no_grad():
        return run.model.loss(run._batch([run.data.train[i] for i in range(16)])).item()


@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_a_few_steps_lower_the_loss(method, kind):
    data = CLS if kind == "bert" else GEN
    # No validation split: all 108 training examples train (20 steps of them must lower the loss by 5%)
    run = Trainer(backbone(kind), spec(method, data, steps=20, eval_every=20, lr=2e-2, val_fraction=0))
    before = fixed_loss(run)
    result = run.run()
    after = fixed_loss(run)
    assert after < 0.95 * before, (before, after, result.history)
    fields = result.artifact.low_rank if method == "lora" else result.artifact.scales
    # The guard's loss test passes; its accuracy test cannot at 20 steps: 12 held-out examples put the sampling
    # noise at +-29 points around the majority class.
    assert fields and "loss did not fall" not in (result.degenerate or "")


def trainer_logits(run: Trainer, ids: list[int]) -> torch.Tensor:
    """The trainer's own forward (its hooks, its head) on one row: class logits, or the last token's vocabulary
    logits."""
    run.model.eval()
    batch = make_batch([ids], run.bb.device, 0, types=[[0] * len(ids)] if run.bb.is_encoder else None)
    with torch.no_grad(), run.model.applied():
        h, pooled, off = run.model.hidden(batch)
        if run.model.head is not None:
            return run.model.class_logits(h, pooled, off, batch)[0]
        return run.bb.logits(h[0, off + len(ids) - 1])


def peft_base(kind):
    """The model PEFT wraps for the exported adapter: the causal LM, or the encoder with a 2-label classifier."""
    if kind != "bert":
        return tiny_model(kind)
    model = tiny_model("bert-cls")
    model.config.num_labels = 2
    model.classifier = torch.nn.Linear(48, 2)
    return model


@pytest.mark.redis
@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
async def test_trained_artifact_served_and_exported_equals_the_trainers_forward(method, kind, store, tmp_path):
    data = CLS if kind == "bert" else GEN
    # One evaluation, at the last step: the published artifact is the trainer's final parameters.
    run = Trainer(backbone(kind), spec(method, data, lr=2e-2))
    result = run.run()
    art = result.artifact
    if method == "lora":
        assert {f.rank for f in art.low_rank.values()} == {8} and {f.scale for f in art.low_rank.values()} == {2.0}
        assert max(f.b.abs().max().item() for f in art.low_rank.values()) > 0  # B has left its zero start
    else:
        assert any(s.on_input for s in art.scales.values()) and not all(s.on_input for s in art.scales.values())
        assert max((s.vector - 1).abs().max().item() for s in art.scales.values()) > 0  # moved from its ones
    ours = trainer_logits(run, IDS)

    stored = await store.put(art)
    model = peft_base(kind)
    async with serving_stack(store, copy.deepcopy(model.bert if kind == "bert" else model)) as stack:
        if kind == "bert":
            (ev,) = [ev async for ev in stack.scheduler.submit("t", IDS).events()]
        else:
            handle = stack.scheduler.submit("t", IDS, SamplingParams(max_new_tokens=1, return_logits=True))
            ev = [ev async for ev in handle.events()][0]
    assert (ev.logits - ours).abs().max().item() <= 1e-5

    export_peft_adapter(stored, tmp_path / "peft")
    peft = PeftModel.from_pretrained(model, tmp_path / "peft").eval()
    with torch.no_grad():
        out = peft(input_ids=torch.tensor([IDS]), attention_mask=torch.ones(1, len(IDS), dtype=torch.long)).logits[0]
    ref = out if kind == "bert" else out[-1]
    assert (ref - ours).abs().max().item() <= 1e-5
    adapted = [n for n, _ in peft.named_modules() if n.endswith(".lora_A" if method == "lora" else ".ia3_l")]
    assert len(adapted) == len(art.low_rank if method == "lora" else art.scales)  # PEFT adapts exactly those


def test_default_targets_are_pefts():
    """The trainer's copies of PEFT's default target modules agree with PEFT wherever PEFT has an entry."""
    from peft.utils import constants as c

    for model_type, targets in low_rank.DEFAULT_TARGETS.items():
        if model_type in c.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
            assert list(targets) == c.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type], model_type
    for model_type, (targets, ff) in scaling.DEFAULTS.items():
        if model_type in c.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING:
            assert list(targets) == c.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type], model_type
            assert list(ff) == c.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type], model_type
        assert set(ff) <= set(targets), model_type


def test_target_options():
    bb = backbone("llama")
    every = Trainer(bb, spec("lora", GEN, target_modules=["all-linear"], lora_r=2, lora_alpha=8)).model.prefix
    assert len(every.paths) == 3 * 7 and every.scale == 4.0 and every.a[0].shape == (2, 64)
    picked = Trainer(bb, spec("lora", GEN, target_modules=["self_attn.o_proj", "layers.1.mlp.up_proj"])).model.prefix
    assert sorted(picked.paths) == sorted([f"layers.{i}.self_attn.o_proj" for i in range(3)] + ["layers.1.mlp.up_proj"])
    ia3 = Trainer(bb, spec("ia3", GEN, target_modules=["q_proj", "up_proj"], feedforward_modules=["up_proj"]))
    sides = dict(zip(ia3.model.prefix.paths, ia3.model.prefix.on_input, strict=True))
    assert sides["layers.0.self_attn.q_proj"] is False and sides["layers.0.mlp.up_proj"] is True
    assert ia3.model.prefix.vectors[0].shape == (64,) and sides.keys() == {
        f"layers.{i}.{m}" for i in range(3) for m in ("self_attn.q_proj", "mlp.up_proj")
    }
    with pytest.raises(ValueError, match=r"target_modules \['qq_proj'\]: no linear projection"):
        Trainer(bb, spec("lora", GEN, target_modules=["q_proj", "qq_proj"]))
    with pytest.raises(ValueError, match="no linear projection"):  # the embeddings are no projection
        Trainer(bb, spec("lora", GEN, target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="not among target_modules"):
        Trainer(bb, spec("ia3", GEN, target_modules=["q_proj"], feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match="over this backbone's limit"):
        Trainer(bb, spec("lora", GEN, lora_r=bb.max_lora_rank + 1))
    with pytest.raises(ValueError, match="give it alone"):
        spec("lora", GEN, target_modules=["all-linear", "q_proj"])
    with pytest.raises(ValueError, match="expected dotted module names"):
        spec("ia3", GEN, feedforward_modules=["all-linear"])
    cli = Namespace(
        task="t", method="ia3", data="d.jsonl", target_modules="k_proj, down_proj", feedforward_modules="down_proj"
    )
    parsed = _spec_from(cli)  # the command line's comma-separated lists
    assert parsed.target_modules == ["k_proj", "down_proj"] and parsed.feedforward_modules == ["down_proj"]


@pytest.mark.redis
async def test_a_queued_sweep_over_lora_and_ia3_publishes_the_best_and_exports_it(store, tmp_path):
    """The worker's path: a sweep over both methods (their defaults), the best published and exported to PEFT; a
    run that learns nothing is held back by the guard."""
    import json

    settings = TrainerSettings(work_dir=tmp_path / "work")
    job = spec("lora", CLS, task="s", steps=20, eval_every=10, sweep={"methods": ["lora", "ia3"], "lrs": [2e-2]})
    job = job.model_copy(update={"export_peft": str(tmp_path / "peft")})
    result = await run_job(backbone("bert"), store, job, settings, "job-1")
    runs = result["runs"]
    assert [r["method"] for r in runs] == ["lora", "ia3"] and result["published"], result.get("reason")
    # served parameters: LoRA r = 8 on query and value of 2 layers of width 48, IA3 on key, value and both
    # output.dense inputs (48 + 48 + 48 + 64), each with the linear head (2 x 48 + 2)
    assert [r["trainable"] for r in runs] == [2 * 2 * 8 * (48 + 48) + 98, 2 * (48 + 48 + 48 + 64) + 98]
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == result["best"]["method"].upper() and config["task_type"] == "SEQ_CLS"

    noise = [{"text": f"w{3 + i % 20}", "label": ["a", "b"][(i * 7919) % 3 % 2]} for i in range(200)]
    stuck = spec("lora", noise, task="u", steps=6, eval_every=3, lr=1e-6)
    held = await run_job(backbone("bert"), store, stuck, settings, "job-2")
    assert "majority-class baseline" in held["degenerate"] and not held["published"]


def test_an_adapter_larger_than_the_default_device_budget_is_evaluated():
    """The trainer's engine holds the evaluated versions' LoRA tables in its device budget: rank 64 on every
    projection of the tiny Llama is 1.5 MB with the tables' zero row, past the 1 MiB a prefix-less job gets."""
    run = Trainer(backbone("llama"), spec("lora", GEN, steps=2, target_modules=["all-linear"], lora_r=64))
    result = run.run()
    assert result.steps == 2 and len(result.artifact.low_rank) == 21
    assert ("t", 1) in run.engine.device_cache.entries  # its evaluation ran with the adapter loaded, not refused
