"""Every row of a mixed-task batch equals its adapter run alone through PEFT (fp32, |dlogit| <= 1e-5, same
greedy tokens), with rows joining while others are mid-decode. The adapters travel the real path."""

import asyncio
import copy

import pytest
import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from transformers import LlamaForSequenceClassification

from service import runner as runner_module
from service.sampling import SamplingParams
from tests.engine_harness import publish_peft, serving_stack, trained_peft
from tests.models import tiny_model

pytestmark = pytest.mark.redis
TOL = 1e-5
STEPS = 6
GEN_TASKS = [  # (task, config class, kwargs): four methods with different prefix lengths, and the bare backbone
    ("prefix", PrefixTuningConfig, dict(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16)),
    ("ptv2", PrefixTuningConfig, dict(num_virtual_tokens=7)),
    ("soft", PromptTuningConfig, dict(num_virtual_tokens=4)),
    ("ptune", PromptEncoderConfig, dict(num_virtual_tokens=5, encoder_hidden_size=16)),
    (None, None, None),
]
PROMPT_LENGTHS = [5, 9, 3, 7, 6]


def _peft_reference(model, ids):
    """Greedy tokens and per-step logits of one row run alone through PEFT's (or the bare model's) generate."""
    out = model.generate(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=STEPS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out.sequences[0, len(ids) :].tolist(), torch.stack(out.logits)[:, 0]


async def _setup_generation(store, kind, tmp_path):
    base = tiny_model(kind)
    references, tasks = [], []
    torch.manual_seed(0)
    prompts = [torch.randint(3, 120, (n,)).tolist() for n in PROMPT_LENGTHS]
    for i, (task, cls, kw) in enumerate(GEN_TASKS):
        model = base
        if cls is not None:
            model = trained_peft(base, cls(task_type="CAUSAL_LM", **kw), seed=10 + i)
            await publish_peft(store, model, task, base.config, tmp_path / task)
        references.append(_peft_reference(model, prompts[i]))
        tasks.append(task)
    return base, tasks, prompts, references


async def _collect(handle, n=None):
    events = []
    async for ev in handle.events():
        events.append(ev)
        if n is not None and len(events) == n:
            break
    return events


async def _run_mixed(stack, tasks, prompts, first_group=3):
    """Submits the first rows, lets them decode two tokens, then submits the rest: they join mid-decode."""
    params = SamplingParams(max_new_tokens=STEPS, return_logits=True, ignore_eos=True)
    handles = [stack.scheduler.submit(t, p, params) for t, p in zip(tasks[:first_group], prompts[:first_group])]
    head = await asyncio.gather(*(_collect(h, 2) for h in handles))
    handles += [stack.scheduler.submit(t, p, params) for t, p in zip(tasks[first_group:], prompts[first_group:])]
    tails = await asyncio.gather(*(_collect(h) for h in handles))
    return [(head[i] if i < first_group else []) + tails[i] for i in range(len(handles))]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
async def test_mixed_generation_matches_peft_alone(store, kind, tmp_path):
    base, tasks, prompts, refs = await _setup_generation(store, kind, tmp_path)
    async with serving_stack(store, copy.deepcopy(base), max_batch_size=8) as stack:
        rows = await _run_mixed(stack, tasks, prompts)
    first_group_last_step = max(ev.step for row in rows[:3] for ev in row)
    second_group_first_step = min(ev.step for row in rows[3:] for ev in row)
    assert second_group_first_step < first_group_last_step, "rows must join while others are mid-decode"
    for task, events, (ref_tokens, ref_logits) in zip(tasks, rows, refs):
        assert [ev.token_id for ev in events] == ref_tokens, task
        assert [ev.finish_reason for ev in events] == [None] * (STEPS - 1) + ["length"]
        diff = max((ev.logits - ref_logits[k]).abs().max().item() for k, ev in enumerate(events))
        assert diff <= TOL, f"{kind} task {task}: max |dlogit| {diff:.2e}"


async def test_negative_control_wrong_positions_fail(store, tmp_path, monkeypatch):
    """With the +P offset dropped (tokens at 0..n-1, the model default), the same comparison must fail."""
    base, tasks, prompts, refs = await _setup_generation(store, "llama", tmp_path)
    right = runner_module.token_positions
    monkeypatch.setattr(
        runner_module,
        "token_positions",
        lambda starts, lengths, T, device: right([0] * len(starts), lengths, T, device),
    )
    async with serving_stack(store, copy.deepcopy(base), max_batch_size=8) as stack:
        rows = await _run_mixed(stack, tasks, prompts)
    diffs = {
        task: max((ev.logits - ref[1][k]).abs().max().item() for k, ev in enumerate(events))
        for task, events, ref in zip(tasks, rows, refs)
    }
    assert diffs["prefix"] > 1e-3 and diffs["ptv2"] > 1e-3, diffs
    assert diffs[None] <= TOL  # the bare backbone has no prefix, so its positions were right all along


async def test_causal_lm_classification_rides_with_generation(store, tmp_path):
    """A SEQ_CLS adapter (LlamaForSequenceClassification + PEFT) served on the causal LM backbone, in the same
    prefill as generation rows: its head reads the last real token, as transformers' score head does."""
    base = tiny_model("llama")
    cls_base = LlamaForSequenceClassification(base.config.__class__(**{**base.config.to_dict(), "num_labels": 3}))
    cls_base.model.load_state_dict(base.model.state_dict())
    cls_base.eval()
    pm = trained_peft(cls_base, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4), seed=3)
    await publish_peft(store, pm, "intent", base.config, tmp_path / "intent", labels=["a", "b", "c"])
    gen = trained_peft(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6), seed=4)
    await publish_peft(store, gen, "gen", base.config, tmp_path / "gen")
    ids = [5, 17, 33, 9, 41, 7]
    with torch.no_grad():
        ref = pm(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0]
    async with serving_stack(store, copy.deepcopy(base)) as stack:
        g = stack.scheduler.submit("gen", [4, 5, 6], SamplingParams(max_new_tokens=3))
        c = stack.scheduler.submit("intent", ids)
        result, (ev,) = await asyncio.gather(g.result(), _collect(c))
    assert (ev.logits - ref).abs().max().item() <= TOL
    assert len(result.token_ids) == 3


async def test_bert_mixed_classification_matches_peft(store, tmp_path):
    base = tiny_model("bert-cls")
    specs = [
        ("prefix", PrefixTuningConfig, dict(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16)),
        ("ptv2", PrefixTuningConfig, dict(num_virtual_tokens=6)),
        ("soft", PromptTuningConfig, dict(num_virtual_tokens=3)),
        ("ptune", PromptEncoderConfig, dict(num_virtual_tokens=2, encoder_hidden_size=16)),
    ]
    torch.manual_seed(1)
    inputs = [torch.randint(3, 120, (n,)).tolist() for n in (7, 4, 9, 5)]
    types = [None, None, None, [0, 0, 1, 1, 1]]  # one sentence pair
    refs = []
    for i, (task, cls, kw) in enumerate(specs):
        pm = trained_peft(base, cls(task_type="SEQ_CLS", **kw), seed=20 + i)
        await publish_peft(store, pm, task, base.config, tmp_path / task, labels=["x", "y", "z"])
        ids = torch.tensor([inputs[i]])
        extra = {} if types[i] is None else {"token_type_ids": torch.tensor([types[i]])}
        with torch.no_grad():
            refs.append(pm(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0])
    async with serving_stack(store, copy.deepcopy(base).bert) as stack:
        results = await asyncio.gather(
            *(
                stack.scheduler.submit(t, x, token_type_ids=tt).result()
                for (t, _, _), x, tt in zip(specs, inputs, types)
            )
        )
        # Prefixes are cached now, so the four requests are ready together and share one forward.
        handles = [
            stack.scheduler.submit(task, ids, token_type_ids=tt) for (task, _, _), ids, tt in zip(specs, inputs, types)
        ]
        events = await asyncio.gather(*(_collect(h) for h in handles))
    assert len({evs[0].step for evs in events}) == 1, "all four tasks ran in one forward"
    for (task, _, _), (ev,), ref, res in zip(specs, events, refs, results):
        assert (ev.logits - ref).abs().max().item() <= TOL, task
        assert res.label == ["x", "y", "z"][int(ref.argmax())]
        assert abs(sum(res.scores.values()) - 1) < 1e-5


async def test_seeded_sampling_is_independent_of_the_batch(store, tmp_path):
    base, tasks, prompts, _ = await _setup_generation(store, "llama", tmp_path)
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=30, top_p=0.95, seed=1234, ignore_eos=True)
    async with serving_stack(store, copy.deepcopy(base), max_batch_size=8) as stack:
        alone = await stack.scheduler.submit("ptv2", prompts[1], params).result()
        others = [
            stack.scheduler.submit(t, p, SamplingParams(max_new_tokens=8, temperature=1.0, seed=i))
            for i, (t, p) in enumerate(zip(tasks, prompts))
        ]
        mixed = stack.scheduler.submit("ptv2", prompts[1], params)
        results = await asyncio.gather(mixed.result(), *(h.result() for h in others))
        another_seed = await stack.scheduler.submit(
            "ptv2",
            prompts[1],
            SamplingParams(max_new_tokens=8, temperature=0.9, top_k=30, top_p=0.95, seed=99, ignore_eos=True),
        ).result()
    assert results[0].token_ids == alone.token_ids
    assert another_seed.token_ids != alone.token_ids
