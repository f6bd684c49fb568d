"""LoRA (low_rank) and IA3 (scaling) tasks served row by row in mixed batches with every other adapter kind: each row
equals its adapter run alone through PEFT (fp32, |dlogit| <= 1e-5, the same greedy tokens over six decode steps), on
Llama, Qwen2 and GPT-2 (its fused c_attn, Conv1D), with rows joining mid-decode, LoRA tasks of several ranks and
target sets (rsLoRA, rank and alpha patterns), classification heads, and the gathered and grouped update paths. Plus
negative controls (the LoRA scale dropped, the IA3 vectors ignored), refusals with clear errors (DoRA, embeddings,
the LM head, a rank over the limit, ...), hooks gone once no task needs them, and export back to a PEFT adapter
that PeftModel.from_pretrained loads. The adapters travel the real path of an upload (PEFT save_pretrained ->
import -> the store's codec); the cases live in tests/golden/cases.py, shared with the golden-output tests."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from collections import Counter

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

from prefix_store import BackboneFingerprint, BackboneMismatch, PrefixArtifact, UnsupportedAdapter, import_peft_dir
from prefix_store.artifact import ChannelScale, LowRank
from prefix_store.peft_io import CONFIG_NAME, export_peft_adapter
from service.runtime import EngineRequest, SamplingParams, low_rank, methods, table_budget, wrap_model
from service.runtime.errors import InputTooLong, PinRefused
from service.runtime.methods import check as check_artifact
from tests.engine_harness import engine_for, run_engine, stored
from tests.factories import make_artifact
from tests.golden.cases import (
    LABELS,
    adapters_bert_case,
    adapters_case,
    adapters_classification_case,
    assert_matches,
    differences,
    random_weights,
    run,
)
from tests.models import tiny_model

KINDS = ["gpt2", "llama", "qwen2"]


def _joined_mid_decode(rows) -> bool:
    first_group_last_step = max(ev.step for row in rows[:3] for ev in row)
    return min(ev.step for row in rows[3:] for ev in row) < first_group_last_step


@pytest.mark.peft_reference("generate")
@pytest.mark.parametrize("kind", KINDS)
def test_every_adapter_kind_in_one_batch_matches_peft_alone(kind, tmp_path):
    """Bare, LoRA (three ranks and target sets), IA3, Prefix-Tuning, prompt tuning, P-Tuning v2 and, where the
    backbone has biases, BitFit rows in the same forwards."""
    case = adapters_case(kind, tmp_path)
    rows = run(case)
    assert _joined_mid_decode(rows), "rows must join while others are mid-decode"
    assert_matches(case, rows)


@pytest.mark.peft_reference("generate")
@pytest.mark.parametrize("path", ["gathered", "grouped"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_gathered_and_grouped_updates_both_match_peft(kind, path, tmp_path, monkeypatch):
    """Every forward forced onto one path: the rows' factors gathered (two batched matmuls) or one matmul pair per
    task over its rows."""
    monkeypatch.setattr(low_rank, "GROUPED_MIN_ROWS_PER_TASK", 10**9 if path == "gathered" else 0)
    case = adapters_case(kind, tmp_path)
    assert_matches(case, run(case))


def _without(case, method: str):
    """The case with its `method` tasks' scale dropped (LoRA) or vectors ignored (IA3)."""
    arts = {}
    for task, art in case.artifacts.items():
        if art.method == method and method == "lora":
            art = dataclasses.replace(art, low_rank={m: LowRank(f.a, f.b, 1.0) for m, f in art.low_rank.items()})
        elif art.method == method:
            ones = {m: ChannelScale(torch.ones_like(s.vector), s.on_input) for m, s in art.scales.items()}
            art = dataclasses.replace(art, scales=ones)
        arts[task] = art
    return dataclasses.replace(case, artifacts=arts)


@pytest.mark.peft_reference("generate")
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_negative_control_scale_dropped_or_vectors_ignored_fail(method, tmp_path):
    case = adapters_case("qwen2", tmp_path)
    diffs = differences(case, run(_without(case, method)))
    for task, art in case.artifacts.items():
        if art.method == method:
            assert diffs[task] > 1e-3, diffs
        else:
            assert diffs[task] <= 1e-5, diffs
    assert diffs[None] <= 1e-5


@pytest.mark.peft_reference("seq_cls")
def test_lora_and_ia3_classification_heads_ride_with_generation(tmp_path):
    """SEQ_CLS LoRA and IA3 adapters (the score head over the last token) in the prefill of a LoRA generation row and
    a bare one."""
    case = adapters_classification_case(tmp_path)
    rows = run(case)
    assert len({evs[0].step for evs in rows}) == 1, "the four rows shared their prefill"
    assert_matches(case, rows)


@pytest.mark.peft_reference("seq_cls")
def test_bert_lora_ia3_and_prefix_classification_in_one_forward(tmp_path):
    case = adapters_bert_case(tmp_path)
    rows = run(case)
    assert len({evs[0].step for evs in rows}) == 1, "all four tasks ran in one forward"
    assert_matches(case, rows)


# -- the tables come and go with their tasks --------------------------------------------------------------------------
def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _import(pm, tmp_path, task="t", **kw):
    pm.save_pretrained(tmp_path / task)
    return import_peft_dir(tmp_path / task, task=task, backbone=BackboneFingerprint.from_config(pm.config), **kw)


def _peft(base, config, seed=0):
    return random_weights(get_peft_model(copy.deepcopy(base), config), seed)


def test_hooks_and_tables_exist_only_while_a_task_needs_them(tmp_path):
    base = tiny_model("llama")
    lora = stored(_import(_peft(base, LoraConfig(r=4, init_lora_weights=False)), tmp_path, "lora"))
    ia3 = stored(_import(_peft(base, IA3Config(task_type="CAUSAL_LM")), tmp_path, "ia3"))
    engine = engine_for(copy.deepcopy(base))
    model = engine.bb.model
    assert _hooks(model) == 0
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    run_engine(
        engine, [EngineRequest.generate("a", [5, 6], lora, params), EngineRequest.generate("b", [7], ia3, params)]
    )
    runner = engine.runner
    assert _hooks(model) == 6 + 9  # q/v of 3 layers; k, v (outputs) and down_proj (input) of 3 layers
    assert runner.low_rank.nbytes > 0 and runner.scales.nbytes > 0
    for task in ("lora", "ia3"):
        engine.invalidate(task, None)
    engine.device_cache.apply_pending()
    assert _hooks(model) == 0
    assert runner.low_rank.nbytes == 0 and runner.scales.nbytes == 0


# -- one device budget: the pool's used blocks and the tables --------------------------------------------------------
_Q = [f"layers.{i}.self_attn.q_proj" for i in range(3)]  # (in, out) = (64, 64): 128 * 4 bytes per rank of a row
_P = SamplingParams(max_new_tokens=1, ignore_eos=True)
_SIZES = {"q_proj": (64, 64), "k_proj": (64, 16), "v_proj": (64, 16), "down_proj": (128, 64)}  # the tiny Llama's
_FP = BackboneFingerprint.from_config(tiny_model("llama").config)


def _lora(task: str, rank: int, modules=_Q, seed: int = 0) -> PrefixArtifact:
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for m in modules:
        n_in, n_out = _SIZES[m.split(".")[-1]]
        factors[m] = LowRank(torch.randn(rank, n_in, generator=g), torch.randn(n_out, rank, generator=g), 0.5)
    return stored(PrefixArtifact(task, "lora", _FP, low_rank=factors))


def _ia3(task: str, sides, seed: int = 0) -> PrefixArtifact:
    g = torch.Generator().manual_seed(seed)
    scales = {}
    for m, on_input in sides:
        width = _SIZES[m.split(".")[-1]][0 if on_input else 1]
        scales[m] = ChannelScale(1 + torch.randn(width, generator=g), on_input)
    return stored(PrefixArtifact(task, "ia3", _FP, scales=scales))


def _prefix(task: str, P: int) -> PrefixArtifact:
    return stored(make_artifact(task, "p_tuning_v2", P=P, fp=_FP))


def _load(engine, *arts, hold: bool = False) -> dict[str, str | None]:
    """Loads each artifact as a request would (held for it unless `hold` is false: released at once, as a cache
    entry); per task, the error's class name or None."""
    reqs = [EngineRequest.generate(f"req-{a.task}", [5, 6], a, _P) for a in arts]
    out = engine.load(reqs)
    for a in arts:
        if out[f"req-{a.task}"] is None and not hold:
            engine.device_cache.release(a.key, f"req-{a.task}")
    return {a.task: None if out[f"req-{a.task}"] is None else type(out[f"req-{a.task}"]).__name__ for a in arts}


def _tables(engine) -> int:
    """What the LoRA and IA3 tables hold on the device, from their tensors."""
    lr = engine.runner.low_rank
    return (
        sum(t.numel() * t.element_size() for f in lr._factors.values() for t in (f.a, f.b))
        + engine.runner.scales.nbytes
    )


def _resident(engine) -> list[str]:
    return [k[0] for k in engine.device_cache.entries]


def test_loads_count_the_rows_the_tables_really_grow_by_and_held_tasks_make_others_wait():
    """Budget 24576 bytes. Rank-2 LoRA on three 64x64 projections: 3 KB a row, the tables 2 rows (row 0 and the
    task's), then 4, then 8. A rank-4 task widens every row of the tables it shares."""
    engine = engine_for(copy.deepcopy(tiny_model("llama")), device_cache_bytes=25_000)
    dc = engine.device_cache
    assert dc.budget == 24576
    held = [_lora(f"h{i}", 2, seed=i) for i in range(3)]
    assert _load(engine, *held[:2], hold=True) == {"h0": None, "h1": None}
    assert _tables(engine) == 4 * 3 * 2 * 128 * 4  # 4 rows: one still free
    wide = _lora("w", 4, seed=9)
    assert table_budget.after(engine.runner, table_budget.Adds(low_rank=dict.fromkeys(_Q, 4))) == 4 * 3 * 4 * 128 * 4
    assert _load(engine, wide) == {"w": None}, "the free row, every row widened to rank 4: 24576 bytes, it fits"
    assert _tables(engine) == dc.used_bytes == 24576
    engine.invalidate("w", None)
    assert _load(engine, held[2], hold=True) == {"h2": None}  # the tables stay at rank 4 (no shrinking)
    before = dict(dc.stats)
    assert _load(engine, _lora("x", 2, seed=5)) == {"x": "DeviceFull"}, "rows would double: 49152, all held"
    assert dc.stats["evictions"] == before["evictions"] and _resident(engine) == ["h0", "h1", "h2"]
    with pytest.raises(InputTooLong, match=r"needs 49152 bytes: it does not fit the device cache at all \(24576"):
        dc.acquire(_lora("huge", 16), "r")  # 2 rows of rank 16 alone: bigger than the budget, whatever it holds
    engine.device_cache.release(held[0].key, "req-h0")
    assert _load(engine, _lora("x", 2, seed=5)) == {"x": None}  # h0 let go: its row is the room
    assert _resident(engine) == ["h1", "h2", "x"] and dc.stats["evictions"] == before["evictions"] + 1
    assert _tables(engine) == dc.used_bytes <= dc.budget


def test_a_prefix_load_evicts_only_what_frees_bytes_and_shares_the_budget_with_the_tables():
    """Budget 3 pool blocks (4608 bytes). Three rank-1 LoRA tasks on one projection share its tables (4 rows, 2048
    bytes): evicting one of them frees a row, no bytes, so a prefix needing room pushes out the older prefix, not
    them. A fourth LoRA task then needs rows: one LoRA task's row is room (the tables need not double), so it goes."""
    engine = engine_for(copy.deepcopy(tiny_model("llama")), device_cache_bytes=3 * 1536)
    dc = engine.device_cache
    for i in range(3):
        assert _load(engine, _lora(f"l{i}", 1, modules=_Q[:1], seed=i)) == {f"l{i}": None}
    assert _tables(engine) == 2048
    assert _load(engine, _prefix("a", 4)) == {"a": None}
    assert _load(engine, _prefix("b", 4)) == {"b": None}
    assert _resident(engine) == ["l0", "l1", "l2", "b"] and dc.stats["evictions"] == 1
    assert dc.used_bytes == 1536 + 2048
    assert _load(engine, _lora("l3", 1, modules=_Q[:1], seed=3)) == {"l3": None}
    assert _resident(engine) == ["l1", "l2", "b", "l3"] and dc.stats["evictions"] == 2
    assert _load(engine, _prefix("c", 8)) == {"c": None}  # 2 blocks: b and then the table's users must go
    assert dc.used_bytes <= dc.budget and "c" in _resident(engine)
    assert _tables(engine) == table_budget.nbytes(engine.runner)


def test_the_budget_model_follows_the_tables_through_mixed_traffic():
    """LoRA tasks of ranks 1 to 6 on several target sets, IA3 tasks on several sides and prefixes, loaded, held, let
    go and invalidated at random: after every step the tables hold what table_budget says, a load that evicted
    nothing grew them by what it predicted, the budget holds, held entries stay, and a refused load evicted nothing."""
    rng = random.Random(0)
    engine = engine_for(copy.deepcopy(tiny_model("llama")), device_cache_bytes=60_000)
    dc, runner = engine.device_cache, engine.runner
    mods = [*_Q, "layers.0.self_attn.v_proj", "layers.1.self_attn.k_proj"]
    sides = [
        ("layers.0.self_attn.k_proj", False),
        ("layers.1.self_attn.v_proj", False),
        ("layers.2.mlp.down_proj", True),
    ]
    held: dict[str, PrefixArtifact] = {}
    outcomes = Counter()
    for step in range(150):
        kind = rng.choice(["lora", "lora", "ia3", "prefix"])
        task = f"t{step}"
        if kind == "lora":
            art = _lora(task, rng.randint(1, 6), rng.sample(mods, rng.randint(1, 3)), seed=step)
        elif kind == "ia3":
            art = _ia3(task, rng.sample(sides, rng.randint(1, 3)), seed=step)
        else:
            art = _prefix(task, rng.randint(1, 12))
        predicted = dc._after_load(methods.load(engine.bb, art))
        evictions, resident = dc.stats["evictions"], set(dc.entries)
        hold = rng.random() < 0.3
        got = _load(engine, art, hold=hold)[task]
        outcomes[got] += 1
        if got is None and dc.stats["evictions"] == evictions:
            assert dc.used_bytes == predicted, step
        if got is not None:
            assert dc.stats["evictions"] == evictions and set(dc.entries) == resident, step
        if got is None and hold:
            held[task] = art
        if held and rng.random() < 0.3:
            gone = held.pop(rng.choice(sorted(held)))
            dc.release(gone.key, f"req-{gone.task}")
        if rng.random() < 0.1 and dc.entries:
            engine.invalidate(rng.choice(list(dc.entries))[0], None)
            dc.apply_pending()
        assert _tables(engine) == table_budget.nbytes(runner), step
        assert dc.used_bytes <= dc.budget, step
        assert all(a.key in dc.entries for a in held.values()), step
    assert outcomes[None] > 50 and outcomes["DeviceFull"] > 5, outcomes


def test_warm_loads_a_lora_task_only_into_room_nothing_uses():
    engine = engine_for(copy.deepcopy(tiny_model("llama")), device_cache_bytes=25_000)
    dc = engine.device_cache
    assert all(engine.warm(_lora(f"l{i}", 2, seed=i)) for i in range(3))  # rows 0 to 3 at rank 2: 12288 bytes
    assert not engine.warm(_lora("wide", 4, seed=7)), "8 rows of rank 4 would take 49152 bytes"
    assert engine.warm(_ia3("s", [("layers.0.self_attn.k_proj", False)]))  # 2 slots of 16: 128 bytes, it fits
    assert dc.stats["evictions"] == 0 and _resident(engine) == ["l0", "l1", "l2", "s"]


def test_pins_count_the_table_rows_they_hold():
    """Pins may hold half the budget (24576 bytes): a rank-2 LoRA task's rows on three projections are 3072 bytes,
    at the tables' rank (6144 once a rank-4 task widened them)."""
    engine = engine_for(copy.deepcopy(tiny_model("llama")), device_cache_bytes=50_000)
    dc = engine.device_cache
    assert dc.pin_budget == 24576
    assert engine.pin(_lora("a", 2, seed=1)) == 3072
    assert _load(engine, _lora("w", 4, seed=2)) == {"w": None}
    assert dc.device_bytes(dc.entries[("a", 1)]) == 6144
    with pytest.raises(PinRefused, match="needs 24576 bytes .* other pins hold 6144 of the 24576") as refused:
        engine.pin(_lora("b", 16, seed=3))  # its rows: 3 * 16 * 128 * 4 bytes
    assert (refused.value.needed, refused.value.left) == (24576, 18432)
    assert engine.pin(_ia3("s", [("layers.0.self_attn.k_proj", False)])) == 64
    assert engine.pins == {"a": 1, "s": 1}


def _hooks_of(engine) -> int:
    return _hooks(engine.bb.model)


def test_a_load_that_fails_part_way_gives_back_what_it_took(monkeypatch):
    """The device out of memory part-way through a load (simulated): the pool blocks, the slots, the rows and
    tables written so far and their hooks all go back, and the next load works."""
    engine = engine_for(copy.deepcopy(tiny_model("llama")))
    dc, runner = engine.device_cache, engine.runner
    lr = runner.low_rank
    put = lr._put
    calls: list[str] = []

    def put_then_fail(path, a, b):
        if calls:
            raise RuntimeError("out of memory (simulated)")
        calls.append(path)
        return put(path, a, b)

    monkeypatch.setattr(lr, "_put", put_then_fail)
    assert _load(engine, _lora("l", 2)) == {"l": "RuntimeError"}
    assert (_hooks_of(engine), lr._factors, int(lr.rows_of.abs().sum()), dc.entries) == (0, {}, 0, {})
    monkeypatch.undo()
    assert _load(engine, _lora("l", 2)) == {"l": None} and _hooks_of(engine) == 3
    assert lr.rows_of[1].count_nonzero() == 3, "the slot the failed load took is handed out again"

    k, v = "layers.0.self_attn.k_proj", "layers.1.self_attn.v_proj"
    with pytest.raises(RuntimeError):
        runner.scales.alloc({k: (torch.ones(16), False), v: (torch.ones(7), False)})  # v's vector fits no table
    assert runner.scales.nbytes == 0 and runner.scales.capacity == 1 and _hooks_of(engine) == 3

    monkeypatch.setattr(dc.pool, "write", lambda index, kv: (_ for _ in ()).throw(RuntimeError("out of memory")))
    assert _load(engine, _prefix("p", 8)) == {"p": "RuntimeError"}
    assert dc.pool.used_bytes == 0 and set(dc.entries) == {("l", 1)}
    monkeypatch.undo()
    assert _load(engine, _prefix("p", 8), _ia3("s", [(k, False), (v, False)])) == {"p": None, "s": None}
    assert dc.used_bytes == table_budget.nbytes(runner) + 2 * 1536


# -- refusals -------------------------------------------------------------------------------------------------------
def _config_edit(tmp_path, pm, **edits):
    pm.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(cfg | edits))
    return tmp_path / "a"


@pytest.mark.parametrize(
    ("config", "edits", "message"),
    [
        (dict(use_dora=True), {}, "DoRA"),
        (dict(target_modules=["embed_tokens", "q_proj"]), {}, "embedding layer"),
        (dict(bias="lora_only"), {}, "bias training"),
        (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), {}, "modules_to_save"),
        (dict(init_lora_weights=False), {"init_lora_weights": "pissa"}, "rewrites the base model's weights"),
        (dict(init_lora_weights=False), {"layer_replication": [[0, 2], [1, 3]]}, "layer_replication"),
    ],
)
def test_lora_forms_the_server_does_not_reproduce_are_refused_by_name(config, edits, message, tmp_path):
    base = tiny_model("llama")
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, **config))
    with pytest.raises(UnsupportedAdapter, match=message):
        import_peft_dir(
            _config_edit(tmp_path, pm, **edits), task="t", backbone=BackboneFingerprint.from_config(base.config)
        )


def test_lm_head_a_rank_over_the_limit_and_another_backbone_are_refused_on_check(tmp_path):
    base = tiny_model("llama")
    bb = wrap_model(copy.deepcopy(base), None, name="tiny", max_lora_rank=4)
    pm = _peft(base, LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    with pytest.raises(UnsupportedAdapter, match="LoRA on the LM head is not served"):
        _import(pm, tmp_path, "h")
    fp = BackboneFingerprint.from_config(base.config)
    factors = LowRank(torch.ones(2, 64), torch.ones(128, 2), 1.0)
    head = PrefixArtifact("h", "lora", fp, low_rank={"lm_head": factors})  # uploaded as an artifact instead
    with pytest.raises(UnsupportedAdapter, match=r"LM head \(lm_head\) is not served"):
        check_artifact(bb, head)
    wide = _import(_peft(base, LoraConfig(r=8, init_lora_weights=False)), tmp_path, "w")
    with pytest.raises(
        UnsupportedAdapter, match="LoRA rank 8 of layers.0.self_attn.q_proj is over this server's limit"
    ):
        check_artifact(bb, wide)
    check_artifact(wrap_model(copy.deepcopy(base), None, name="tiny"), wide)  # the default limit is 64
    gpt2 = wrap_model(tiny_model("gpt2"), None, name="gpt2")
    ok = _import(_peft(base, LoraConfig(r=2, init_lora_weights=False)), tmp_path, "ok")
    with pytest.raises(BackboneMismatch):
        check_artifact(gpt2, ok)


def test_adapters_on_heads_outside_the_body_are_refused_as_not_served(tmp_path):
    """The LM head and BERT's masked-LM head are no backbone mismatch (409): the server does not adapt heads (400)."""
    llama = wrap_model(tiny_model("llama"), None, name="tiny")
    fp = llama.fingerprint
    on_head = PrefixArtifact("h", "ia3", fp, scales={"lm_head": ChannelScale(torch.ones(128), False)})
    with pytest.raises(UnsupportedAdapter, match=r"IA3 on the LM head \(lm_head\) is not served"):
        check_artifact(llama, on_head)
    base = tiny_model("bert-mlm")
    bert = wrap_model(copy.deepcopy(base), None, name="bert")
    pm = _peft(base, LoraConfig(r=2, target_modules=["query", "dense"], init_lora_weights=False))
    art = _import(pm, tmp_path, "mlm")
    assert "cls.predictions.transform.dense" in art.low_rank
    with pytest.raises(UnsupportedAdapter, match="LoRA on cls.predictions.transform.dense is not served: it belongs"):
        check_artifact(bert, art)
    pm = _peft(base, IA3Config(target_modules=["value", "dense"], feedforward_modules=[]))
    with pytest.raises(UnsupportedAdapter, match="IA3 on cls.predictions.transform.dense is not served"):
        check_artifact(bert, _import(pm, tmp_path, "mlm-ia3"))


# -- export ---------------------------------------------------------------------------------------------------------
_ALL_LINEAR = dict(target_modules="all-linear", rank_pattern={"down_proj": 5}, alpha_pattern={"gate_proj": 3})


@pytest.mark.parametrize(
    ("kind", "config"),
    [
        ("llama", LoraConfig(r=2, lora_alpha=6, init_lora_weights=False, **_ALL_LINEAR)),
        ("gpt2", LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["c_attn", "c_fc"])),
        ("gpt2", IA3Config()),
        ("qwen2", IA3Config(target_modules=["q_proj", "gate_proj"], feedforward_modules=["gate_proj"])),
    ],
    ids=["llama-lora-patterns", "gpt2-lora-rslora", "gpt2-ia3", "qwen2-ia3"],
)
def test_export_gives_back_an_adapter_peft_loads_with_the_same_outputs(kind, config, tmp_path):
    base = tiny_model(kind)
    config.task_type = "CAUSAL_LM"
    pm = _peft(base, config, seed=3)
    art = stored(_import(pm, tmp_path))
    out = export_peft_adapter(art, tmp_path / "exported")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    ids = torch.tensor([[5, 9, 17, 33, 8]])
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - pm(input_ids=ids).logits).abs().max().item() <= 1e-5
    again = import_peft_dir(out, task="t", backbone=art.fingerprint)
    for got, want in ((again.low_rank, art.low_rank), (again.scales, art.scales)):
        assert (got is None) == (want is None)
        for m in want or {}:
            if isinstance(want[m], LowRank):
                assert torch.equal(got[m].a, want[m].a) and torch.equal(got[m].b, want[m].b)
                assert got[m].scale == pytest.approx(want[m].scale, rel=1e-12)
            else:
                assert torch.equal(got[m].vector, want[m].vector) and got[m].on_input == want[m].on_input


def test_a_lora_classifier_exports_with_its_head(tmp_path):
    base = tiny_model("llama-cls")
    pm = _peft(base, LoraConfig(task_type="SEQ_CLS", r=4, init_lora_weights=False), seed=4)
    art = stored(_import(pm, tmp_path, labels=LABELS))
    assert art.head is not None and art.head.pooling == "last_token"
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), export_peft_adapter(art, tmp_path / "exported")).eval()
    ids = torch.tensor([[5, 9, 17, 33, 8]])
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - pm(input_ids=ids).logits).abs().max().item() <= 1e-5
