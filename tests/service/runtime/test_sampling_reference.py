"""The sampling surface against references: every logits transform of a mixed batch equals transformers' logits
processors (or, for OpenAI's presence/frequency penalties, which transformers lacks, their published formula) applied
to that row alone; in the engine, rows with different parameters in one batch give the tokens they give alone, and a
greedy row with penalties gives the tokens of transformers' generate on the same model. The engine is driven
directly (no Redis), except where the scheduler's part is the point (n choices sharing one prefill)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PrefixTuningConfig
from transformers import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from service.runtime import EngineRequest, SamplingParams, Submission
from service.runtime.sampling import TokenHistory, filter_logits, forbid_ending, penalise
from tests.engine_harness import engine_for, generate, import_peft, publish_peft, serving_stack, trained_peft
from tests.models import tiny_model

V = 64
ROWS = [
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.95, repetition_penalty=1.5),
    SamplingParams(temperature=1.0, min_p=0.1, presence_penalty=0.8, frequency_penalty=0.3),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=0.8, frequency_penalty=-0.5),
    SamplingParams(temperature=1.0, min_tokens=5, stop_token_ids=[3, 4]),
    SamplingParams(),  # greedy: the cuts leave it alone
]


def reference_row(logits: torch.Tensor, prompt: list[int], generated: list[int], p: SamplingParams, eos: int):
    """One row through transformers' processors in generate's order; presence/frequency by OpenAI's formula."""
    ids = torch.tensor([prompt + generated])
    x = logits[None].clone()
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    x = procs(ids, x)
    counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=V).float()
    x = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    if p.min_tokens:
        ending = sorted({eos, *p.stop_token_ids})
        x = MinNewTokensLengthLogitsProcessor(len(prompt), p.min_tokens, ending)(ids, x)
    if not p.greedy:
        warpers = LogitsProcessorList([TemperatureLogitsWarper(p.temperature)])
        if p.top_k:
            warpers.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1:
            warpers.append(TopPLogitsWarper(p.top_p))
        if p.min_p:
            warpers.append(MinPLogitsWarper(p.min_p))
        x = warpers(ids, x)
    return x[0]


def test_every_transform_equals_transformers_per_row():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(ROWS), V, generator=g) * 3
    prompts = [torch.randint(0, V, (7,), generator=g).tolist() for _ in ROWS]
    generated = [torch.randint(0, V, (3,), generator=g).tolist() for _ in ROWS]
    counts = torch.stack([torch.bincount(torch.tensor(x), minlength=V).float() for x in generated])
    seen = torch.zeros(len(ROWS), V, dtype=torch.bool)
    for i, (pr, ge) in enumerate(zip(prompts, generated, strict=True)):
        seen[i, pr + ge] = True
    eos = 2
    x = penalise(logits.clone(), ROWS, TokenHistory(counts, seen))
    young = [(i, sorted({eos, *p.stop_token_ids})) for i, p in enumerate(ROWS) if p.min_tokens > len(generated[i])]
    x = filter_logits(forbid_ending(x, young), ROWS)
    want = [reference_row(logits[i], prompts[i], generated[i], p, eos) for i, p in enumerate(ROWS)]
    assert all(same(x[i], want[i]) for i in range(len(ROWS)))
    # the negative control: the penalties left out, the penalised rows no longer match
    wrong = filter_logits(logits.clone(), ROWS)
    assert same(wrong[0], want[0]) and not same(wrong[1], want[1]) and not same(wrong[3], want[3])


def same(x: torch.Tensor, want: torch.Tensor) -> bool:
    """Same tokens cut, and the kept logits equal to 1e-5."""
    kept = torch.isfinite(want)
    return torch.equal(torch.isfinite(x), kept) and bool((x[kept] - want[kept]).abs().max() <= 1e-5)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


GEN = [
    dict(temperature=0.0, repetition_penalty=1.8, max_new_tokens=10),
    dict(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.7, max_new_tokens=10),
    dict(temperature=1.1, top_k=8, seed=3, max_new_tokens=10),
    dict(temperature=0.8, top_p=0.7, min_p=0.05, seed=4, repetition_penalty=1.3, max_new_tokens=10),
    dict(temperature=0.0, min_tokens=6, max_new_tokens=8, logprobs=True, top_logprobs=5),
    dict(temperature=0.0, max_new_tokens=10),
]


def test_rows_of_a_mixed_batch_equal_their_runs_alone(llama, tmp_path):
    arts = {}
    for i, task in enumerate(("a", "b")):
        pm = trained_peft(llama, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3 + i), seed=i)
        arts[task] = import_peft(pm, task, llama.config, tmp_path / task)
    prompts = [[5, 6, 7, 5, 6], [9, 10], [11, 12, 13], [5, 5, 5], [20, 21], [30]]
    tasks = ["a", "b", None, "a", "b", None]
    engine = engine_for(copy.deepcopy(llama))

    def request(i: int, rid: str) -> EngineRequest:
        return EngineRequest.generate(rid, prompts[i], arts.get(tasks[i]), SamplingParams(**GEN[i]))

    alone = [generate(engine, [request(i, f"alone{i}")])[0] for i in range(len(GEN))]
    mixed = generate(engine, [request(i, f"mixed{i}") for i in range(len(GEN))])
    for i, (a, m) in enumerate(zip(alone, mixed, strict=True)):
        assert a.token_ids == m.token_ids, (i, GEN[i])
        assert a.logprobs == pytest.approx(m.logprobs, abs=1e-5) if a.logprobs else True
    assert len(alone[4].token_ids) >= 6, "min_tokens held the ending back"
    tops = alone[4].top_logprobs
    assert tops is not None and all(len(t) == 5 for t in tops)
    assert all(t[0][1] >= t[-1][1] for t in tops)


@pytest.mark.parametrize(
    "kw, hf",
    [
        (dict(repetition_penalty=1.8), dict(repetition_penalty=1.8)),
        (dict(min_tokens=8, ignore_eos=False), dict(min_new_tokens=8)),
    ],
)
def test_greedy_with_penalties_equals_transformers_generate(llama, kw, hf):
    prompt = [5, 6, 7, 5, 6, 7]
    model = copy.deepcopy(llama)
    model.generation_config.eos_token_id = 2
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0, **hf
        )
    want = out[0, len(prompt) :].tolist()
    if 2 in want:
        want = want[: want.index(2) + 1]
    (res,) = generate(
        engine_for(model), [EngineRequest.generate("r", prompt, None, SamplingParams(max_new_tokens=8, **kw))]
    )
    assert res.token_ids == want


@pytest.mark.parametrize("chunk", [3, 8192])
def test_prompt_logprobs_equal_peft_across_prefill_chunks(llama, tmp_path, chunk):
    """echo's prompt log-probabilities: token t given tokens < t under the task's prefix, as PEFT computes them,
    also when the prompt is prefilled in chunks of 3 tokens."""
    pm = trained_peft(llama, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), seed=7)
    art = import_peft(pm, "t", llama.config, tmp_path / "t")
    prompt = [5, 6, 7, 8, 9, 10, 11, 12]
    with torch.no_grad():
        lp = torch.log_softmax(pm(input_ids=torch.tensor([prompt])).logits[0].float(), -1)  # (T, V)
    want = lp[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    params = SamplingParams(max_new_tokens=2, prompt_logprobs=True, top_logprobs=3)
    engine = engine_for(copy.deepcopy(llama), max_prefill_tokens=chunk)
    (res,) = generate(engine, [EngineRequest.generate("r", prompt, art, params)])
    got = res.prompt_logprobs
    assert got[0] is None and len(got) == len(prompt)
    assert (torch.tensor([g[0] for g in got[1:]]) - want).abs().max() <= 1e-5
    top = got[1][1]
    assert [i for i, _ in top] == torch.topk(lp[0], 3).indices.tolist()


@pytest.mark.redis
async def test_n_choices_prefill_the_prompt_once(store, llama, tmp_path):
    """The n choices of a prompt: the first prefills it, the others copy its key/values (one prefill of the prompt,
    not n), and each choice gives the tokens it gives when run alone with its seed."""
    pm = trained_peft(llama, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), seed=9)
    await publish_peft(store, pm, "t", llama.config, tmp_path / "t")
    prompt = list(range(5, 45))
    params = [SamplingParams(max_new_tokens=6, temperature=1.0, seed=20 + i, prompt_logprobs=True) for i in range(4)]
    async with serving_stack(store, copy.deepcopy(llama)) as stack:
        runner = stack.engine.runner
        prefilled: list[int] = []
        original = runner.prefill

        def counting(chunks):
            prefilled.extend(len(c.ids) for c in chunks)
            return original(chunks)

        runner.prefill = counting
        alone = [await stack.scheduler.submit("t", prompt, p).result() for p in params]
        assert sum(prefilled) == 4 * len(prompt)
        prefilled.clear()
        handles = stack.scheduler.submit_all(
            [Submission(prompt, "t", p, fork_of=0 if i else None) for i, p in enumerate(params)]
        )
        forked = [await h.result() for h in handles]
    assert sum(prefilled) == len(prompt), "one prefill for the four choices"
    assert [r.token_ids for r in forked] == [r.token_ids for r in alone]
    for a, f in zip(alone, forked, strict=True):
        assert all(
            (x is None and y is None) or abs(x[0] - y[0]) < 1e-5
            for x, y in zip(a.prompt_logprobs, f.prompt_logprobs, strict=True)
        )
