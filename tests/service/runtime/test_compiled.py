"""The compiled decode step (runtime/compiled.py) against the eager one and against PEFT, its eager fallback, and a
control that a wrong padding is caught.

Compiling is slow on a CPU (about 10-15 s per graph of the tiny Llama), so the tests share one compiled engine
(dynamo keeps its graphs per model) and only the buckets they need: up to 4 rows (batch buckets 1, 2, 4), prefixes
of at most 16 tokens (prefix bucket 16) and rows of at most 64 tokens (slot bucket 64); a step of bare rows only
adds bucket 0.
"""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from prefix_store import BackboneFingerprint, PrefixArtifact
from prefix_store.artifact import LowRank
from service.runtime import EngineRequest, SamplingParams, compiled
from service.runtime.compiled import Key, batch_buckets, prefix_bucket, slot_bucket
from service.runtime.engine import Engine
from tests.engine_harness import engine_for, run_engine, stored
from tests.factories import make_artifact
from tests.models import tiny_model

ROWS = 4
PARAMS = SamplingParams(max_new_tokens=6, ignore_eos=True, return_logits=True)


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def engines(base) -> tuple[Engine, Engine]:
    """(compiled, eager) engines around copies of one model; the compiled one keeps its graphs across tests."""
    kw = {"max_rows": ROWS, "device_cache_bytes": 1 << 20, "max_prefill_tokens": 64}
    return engine_for(copy.deepcopy(base), compile=True, **kw), engine_for(copy.deepcopy(base), **kw)


def tasks(fp: BackboneFingerprint) -> list[PrefixArtifact]:
    return [
        stored(make_artifact(f"t{i}", m, P=P, seed=i, fp=fp))
        for i, (m, P) in enumerate([("p_tuning_v2", 6), ("prefix_tuning", 16), ("p_tuning_v2", 11)])
    ]


def lora(fp: BackboneFingerprint) -> PrefixArtifact:
    g = torch.Generator().manual_seed(3)
    factors = {
        f"layers.{i}.self_attn.q_proj": LowRank(torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g), 0.5)
        for i in range(3)
    }
    return stored(PrefixArtifact("lora", "lora", fp, low_rank=factors))


def schedule(arts: list[PrefixArtifact | None], seed: int = 0) -> dict[int, list[EngineRequest]]:
    """Rows of mixed tasks, prefix lengths and bare rows joining at steps 0, 2, 3 and 7 with different lengths, so
    rows finish and join between steps and the decode batch crosses the buckets 1 -> 2 -> 4 -> 2 -> ..."""
    g = torch.Generator().manual_seed(seed)
    plan: dict[int, list[EngineRequest]] = {}
    joins = [(0, 3), (2, 5), (3, 2), (3, 8), (7, 4), (7, 1)]  # (step, prompt tokens)
    for i, ((step, n), art) in enumerate(zip(joins, arts, strict=False)):
        prompt = torch.randint(3, 120, (n,), generator=g).tolist()
        params = SamplingParams(max_new_tokens=3 + 2 * (i % 3), ignore_eos=True, return_logits=True)
        plan.setdefault(step, []).append(EngineRequest.generate(f"r{i}", prompt, art, params))
    return plan


def assert_same(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for rid, outs in want.items():
        assert [o.token_id for o in got[rid]] == [o.token_id for o in outs], f"{rid}: tokens differ"
        for a, b in zip(got[rid], outs, strict=True):
            diff = (a.logits - b.logits).abs().max().item()
            assert diff <= tol, f"{rid} step {a.step}: logits differ by {diff}"


def test_buckets():
    assert batch_buckets(4) == [1, 2, 4] and batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert [prefix_bucket(p) for p in (0, 1, 16, 17, 100)] == [0, 16, 16, 32, 128]
    assert [slot_bucket(s, 512) for s in (1, 64, 65, 300, 600)] == [64, 64, 128, 512, 512]


@pytest.mark.slow  # each graph compiles for seconds (the slow tests still run in `make test`)
def test_compiled_equals_eager_on_mixed_tasks_and_joining_rows(engines, base):
    """Mixed tasks (prefixes of 6, 16 and 11 tokens), bare rows, rows finishing and joining between steps: every
    decode step's logits within 1e-5 of the eager engine's and the same greedy tokens, every row; and the steps
    really ran through graphs of every batch bucket."""
    fast, eager = engines
    fp = BackboneFingerprint.from_config(base.config)
    t = tasks(fp)
    arts = [t[0], t[1], None, t[2], t[0], None]
    before = fast.compiled.steps["compiled"]
    assert_same(run_engine(fast, schedule(arts)), run_engine(eager, schedule(arts)))
    assert fast.compiled.steps["compiled"] - before >= 10
    assert {k.B for k in fast.compiled.graphs} >= {1, 2, 4}


@pytest.mark.slow
def test_rows_with_per_row_adapters_run_eagerly_and_equal(engines, base):
    """A LoRA row in the batch: those steps fall back to eager (counted), the others stay compiled, all exact."""
    fast, eager = engines
    fp = BackboneFingerprint.from_config(base.config)
    t = tasks(fp)
    arts = [t[0], lora(fp), t[1], None]
    before = dict(fast.compiled.steps)
    assert_same(run_engine(fast, schedule(arts, seed=1)), run_engine(eager, schedule(arts, seed=1)))
    assert fast.compiled.steps["per-row adapters"] > before.get("per-row adapters", 0)


@pytest.mark.slow
def test_past_the_graph_limit_a_new_shape_runs_eagerly(engines, base):
    fast, eager = engines
    fp = BackboneFingerprint.from_config(base.config)
    limit, fast.compiled.max_graphs = fast.compiled.max_graphs, len(fast.compiled.graphs)
    try:
        long = stored(make_artifact("long", "p_tuning_v2", P=40, seed=7, fp=fp))  # prefix bucket 64: no graph
        reqs = [EngineRequest.generate("a", [5, 6, 7], long, PARAMS)]
        assert_same(run_engine(fast, reqs), run_engine(eager, [EngineRequest.generate("a", [5, 6, 7], long, PARAMS)]))
        assert fast.compiled.steps["no graph for the shape"] >= PARAMS.max_new_tokens - 1
    finally:
        fast.compiled.max_graphs = limit


@pytest.mark.slow
def test_control_padding_rows_that_write_corrupt_a_prefilling_row(engines, base, monkeypatch):
    """Negative control: padding rows marked real write their token at position 0 of their slots. Three rows decode
    (bucket 4) while a long prompt prefills in slot 3 in chunks: its first key is overwritten and its output changes,
    so the comparison would catch padding that is not masked."""
    fast, eager = engines
    fp = BackboneFingerprint.from_config(base.config)
    t = tasks(fp)
    g = torch.Generator().manual_seed(5)

    def plan() -> dict[int, list[EngineRequest]]:
        short = [EngineRequest.generate(f"d{i}", [9 + i, 4], t[i], PARAMS) for i in range(3)]
        long = EngineRequest.generate("p", torch.randint(3, 120, (40,), generator=g).tolist(), t[0], PARAMS)
        return {0: short, 1: [long]}

    fast.max_prefill_tokens = eager.max_prefill_tokens = 8  # the long prompt prefills over 5 steps
    g.manual_seed(5)
    want = run_engine(eager, plan())
    g.manual_seed(5)
    assert_same(run_engine(fast, plan()), want)  # masked padding: exact
    real = torch.ones(ROWS, dtype=torch.bool)
    monkeypatch.setattr(compiled.CompiledDecode, "_real", lambda self, B, n: real[:B], raising=True)
    g.manual_seed(5)
    with pytest.raises(AssertionError, match=r"^p[: ]"):
        assert_same(run_engine(fast, plan()), want)
    fast.max_prefill_tokens = eager.max_prefill_tokens = 64


@pytest.mark.slow
def test_warm_compiles_a_new_bucket_without_writing_into_slots(engines):
    fast, _ = engines
    key = Key(1, 32, 64)  # prefix bucket 32: no other test compiles it
    assert key not in fast.compiled.graphs
    fast.cache.ensure_width(64)
    rows = fast.cache.rows
    with torch.inference_mode():  # the cache's tensors are inference tensors
        for k in fast.cache.k:  # slots holding something, so a stray write would show
            k[:, :rows] = torch.randn_like(k[:, :rows])
    before = [k[:, :rows].clone() for k in fast.cache.k]
    fast.compiled.progress = compiled.WarmProgress()
    fast.compiled.warm_all([key])
    assert key in fast.compiled.graphs and fast.compiled.graphs[key] > 0, "it compiled"
    assert fast.compiled.progress.warmed == 1 and fast.compiled.progress.done
    after = [k[:, :rows] for k in fast.cache.k]  # the scratch slot (index rows) is the padding rows' to write
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), "warming wrote into slots"
    assert set(fast.compile_keys()) >= {Key(b, 0, 64) for b in (1, 2, 4)}


def test_a_graph_that_fails_leaves_its_shape_to_eager_steps(engines, base, monkeypatch):
    """A graph that cannot compile or run (no C++ compiler for inductor, a family that breaks the trace): its steps
    run eagerly and exactly, the failure is recorded, and the warm-up still ends (so /ready turns ready)."""
    fast, eager = engines
    monkeypatch.setattr(fast.compiled, "graphs", {})
    monkeypatch.setattr(fast.compiled, "failed", {})

    def broken(*args, **kwargs):
        raise RuntimeError("InductorError: no working C++ compiler found")

    monkeypatch.setattr(fast.compiled, "_fn", broken)
    reqs = lambda: [EngineRequest.generate("a", [5, 6, 7], None, PARAMS)]  # noqa: E731
    before = fast.compiled.steps["the shape's graph failed"]
    assert_same(run_engine(fast, reqs()), run_engine(eager, reqs()))
    assert fast.compiled.steps["the shape's graph failed"] - before >= PARAMS.max_new_tokens - 1
    assert "no working C++ compiler" in next(iter(fast.compiled.failed.values()))
    progress = compiled.WarmProgress()
    monkeypatch.setattr(fast.compiled, "progress", progress)
    fast.compiled.warm_all([Key(2, 0, 64)])
    assert progress.done and Key(2, 0, 64) in fast.compiled.failed and not fast.compiled.graphs


def test_a_pow2_cache_lays_out_the_same_segments_for_the_same_width():
    """Compiled graphs bake the segments' bounds in: after a shrink and a regrow to the same width, the same ones."""
    from service.runtime.kv_cache import SlotCache

    fp = BackboneFingerprint.from_config(tiny_model("llama").config)
    cache = SlotCache(fp, rows=2, max_width=1000, dtype=torch.float32, device=torch.device("cpu"), pow2=True)
    cache.ensure_width(300)
    assert cache.starts == [0, 64, 128, 256] and cache.width == 512
    cache.shrink(100)
    assert cache.starts == [0, 64]
    cache.ensure_width(600)  # to 1000, the context window, one doubling at a time
    assert cache.starts == [0, 64, 128, 256, 512] and cache.width == 1000
    cache.shrink(100)
    cache.ensure_width(300)
    assert cache.starts == [0, 64, 128, 256] and cache.width == 512


@pytest.mark.slow  # each graph compiles for seconds (the slow tests still run in `make test`)
def test_compiled_equals_recorded_peft_outputs():
    """The golden llama case (mixed prefix-tuning / P-tuning v2 tasks and bare rows, recorded from PEFT) through the
    compiled engine."""
    from tests.golden.cases import assert_matches, load, run

    case = load("llama")
    assert_matches(case, run(case, compile=True))


def test_sliding_window_layers_run_every_step_eagerly():
    """A backbone with sliding-window layers (rings in the slot cache): compile on, every decode step runs eagerly
    (nothing is compiled), and the outputs equal compile off."""
    from tests.families import family_model

    base = family_model("qwen2-window")
    fp = BackboneFingerprint.from_config(base.config)
    art = stored(make_artifact("w", "p_tuning_v2", P=5, seed=1, fp=fp))

    def reqs() -> list[EngineRequest]:
        return [
            EngineRequest.generate(f"r{i}", [4 + i, 9, 7, 3][: 2 + i], art if i else None, PARAMS) for i in range(3)
        ]

    fast = engine_for(copy.deepcopy(base), compile=True, max_rows=4, device_cache_bytes=1 << 20)
    assert_same(run_engine(fast, reqs()), run_engine(engine_for(copy.deepcopy(base), max_rows=4), reqs()))
    assert fast.compiled is not None and not fast.compiled.graphs
    assert fast.compiled.steps == {"sliding-window layers": PARAMS.max_new_tokens - 1}


@pytest.mark.slow
def test_warm_up_reports_its_progress_one_engine_job_per_graph(engines):
    """The service's warm-up (compiled.warm_up, what /ready's `compile` check reads): the keys are asked for on the
    engine's thread, then one job per graph, progress counted between them. Past the graph limit a key is skipped
    (set here to what exists, so nothing new compiles in this test)."""
    fast, _ = engines
    assert fast.compiled is not None
    progress = compiled.WarmProgress()
    seen: list[bool | str] = []

    async def on_engine(fn):
        seen.append(progress.check)
        return fn(fast)

    limit, fast.compiled.max_graphs = fast.compiled.max_graphs, len(fast.compiled.graphs)
    try:
        asyncio.run(compiled.warm_up(on_engine, progress))
    finally:
        fast.compiled.max_graphs = limit
    n = len(fast.compile_keys())
    assert seen == ["compiling decode graphs: 0/? buckets"] + [
        f"compiling decode graphs: {i}/{n} buckets" for i in range(n)
    ]
    assert progress.check is True and progress.warmed == progress.buckets == n


@pytest.mark.redis
@pytest.mark.slow
async def test_ready_reports_the_warm_up_and_requests_then_run_compiled(redis_url, store, base):
    """The service with PREFIXSERVE_COMPILE=on: /ready answers 503 with the compile check's progress while the graph
    (one batch bucket: max_batch_size 1) compiles in the background, then 200; a generation then runs compiled."""
    from service.app import create_app
    from service.runtime import wrap_model
    from service.settings import ServiceSettings
    from tests.service.live import asgi_client

    root = {"Authorization": "Bearer root"}
    settings = ServiceSettings(
        redis_url=redis_url, namespace=store.ns, admin_keys=["root"], compile="on", max_batch_size=1
    )
    app = create_app(settings, backbone=wrap_model(copy.deepcopy(base), None, name="tiny-llama"))
    async with asgi_client(app) as c:
        seen = []
        for _ in range(1200):  # up to 2 minutes: compiling on a loaded 2-core machine
            r = await c.get("/ready", headers=root)
            seen.append((r.status_code, r.json()["checks"]["compile"]))
            if seen[-1][1] is True:
                break
            await asyncio.sleep(0.1)
        assert seen[0][0] == 503 and str(seen[0][1]).startswith("compiling decode graphs: ")
        assert seen[-1] == (200, True)
        r = await c.post(
            "/v1/generate", json={"task": "base", "input_ids": [5, 6, 7], "max_new_tokens": 4}, headers=root
        )
        assert r.status_code == 200, r.text
        compiled_steps = app.state.services.engine.compiled
        assert compiled_steps.steps["compiled"] == 3, (compiled_steps.steps, compiled_steps.failed)
