"""Rows in slots: the prefix pool, rows leaving (their slot refilled by the last decoder), rows joining, and chunked
prefill leave every row's logits as they are when the row runs alone."""

import torch

from prefix_store import BackboneFingerprint
from service.runtime import Engine, EngineRequest, SamplingParams, StepPlan, wrap_model
from service.runtime.kv_cache import BLOCK, PrefixPool
from tests.factories import make_artifact
from tests.models import tiny_model

TOL = 1e-5


def _engine(**kw) -> Engine:
    return Engine(wrap_model(tiny_model("llama"), None, name="t"), **kw)


def _request(i: int, prompt: list[int], P: int, new: int = 6) -> EngineRequest:
    fp = BackboneFingerprint.from_config(tiny_model("llama").config)
    art = make_artifact(f"t{i}", "p_tuning_v2", P=P, fp=fp, seed=i)
    art.version = 1
    params = SamplingParams(max_new_tokens=new, return_logits=True, ignore_eos=True)
    return EngineRequest.generate(f"r{i}", prompt, art, params)


def _run(engine: Engine, admit_at: dict[int, list[EngineRequest]], cancel_at: dict[int, set[str]] | None = None):
    """Steps the engine until idle; returns each request's per-step logits."""
    logits: dict[str, list[torch.Tensor]] = {}
    cancel_at = cancel_at or {}
    step = 0
    while step == 0 or engine.running or any(k > step for k in admit_at):
        out = engine.step(StepPlan(tuple(admit_at.get(step, ())), frozenset(cancel_at.get(step, ()))))
        for row in out.rows:
            if row.logits is not None:
                logits.setdefault(row.request_id, []).append(row.logits)
        step += 1
    return logits


def _alone(req: EngineRequest, **kw) -> list[torch.Tensor]:
    return _run(_engine(**kw), {0: [req]})[req.request_id]


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    assert max((x - y).abs().max().item() for x, y in zip(a, b)) <= TOL


def test_prefix_pool_hands_out_blocks_and_grows():
    fp = BackboneFingerprint.from_config(tiny_model("llama").config)
    pool = PrefixPool(fp, dtype=torch.float32, device=torch.device("cpu"), max_bytes=64 * BLOCK * pool_token_bytes(fp))
    a = pool.alloc(5)
    b = pool.alloc(3 * BLOCK)
    assert a.shape == (5,) and b.shape == (3 * BLOCK,) and not set(a.tolist()) & set(b.tolist())
    kv = torch.randn(fp.num_layers, 2, fp.num_kv_heads, 5, fp.head_dim)
    pool.write(a, kv)
    k, v = pool.gather(1, a[None])  # (1, H_kv, 5, D)
    assert torch.equal(k[0], kv[1, 0]) and torch.equal(v[0], kv[1, 1])
    used = pool.used_bytes
    pool.release(a)
    assert pool.used_bytes == used - 2 * BLOCK * pool.token_bytes  # 5 tokens took two blocks
    assert pool.alloc(65 * BLOCK) is None  # past the byte budget


def pool_token_bytes(fp) -> int:
    return 2 * fp.num_layers * fp.num_kv_heads * fp.head_dim * 4


def test_rows_leaving_and_joining_keep_every_rows_logits():
    a, b, c = _request(0, [5, 6, 7, 8, 9], P=2), _request(1, [12], P=9), _request(2, [13, 14, 15], P=4, new=3)
    d = _request(3, [20, 21], P=6)
    # c finishes first (its slot is refilled by the last decoder), a is cancelled mid-way, d joins late.
    mixed = _run(_engine(max_rows=4), {0: [a, b, c], 4: [d]}, cancel_at={3: {"r0"}})
    for req in (b, c, d):
        _close(mixed[req.request_id], _alone(req))
    assert len(mixed["r0"]) == 3 and all((x - y).abs().max() <= TOL for x, y in zip(mixed["r0"], _alone(a)[:3])), (
        "a's outputs before its cancellation"
    )


def test_chunked_prefill_equals_one_forward():
    long = _request(0, list(range(3, 40)), P=5)
    chunked = _run(_engine(max_prefill_tokens=8), {0: [long]})["r0"]
    _close(chunked, _alone(long))


def test_decoders_keep_going_while_a_long_prompt_is_chunked():
    short = _request(0, [5, 6], P=3, new=12)
    long = _request(1, list(range(3, 100)), P=4, new=2)
    engine = _engine(max_prefill_tokens=16)
    steps_with_a_token: list[int] = []
    step = 0
    engine.step(StepPlan((short,)))
    while engine.running:
        out = engine.step(StepPlan((long,) if step == 0 else ()))
        if any(r.request_id == "r0" and r.token_id is not None for r in out.rows):
            steps_with_a_token.append(step)
        step += 1
    # 97 prompt tokens in chunks of at most 16 take 7 steps; the short row got a token in every one of them.
    assert steps_with_a_token[:7] == list(range(7))


def test_rows_spanning_slot_segments_equal_one_segment():
    """A short row first sizes the slots to itself; a long row joining later adds a segment and spans both. The
    logits equal those of the same run with one segment wide enough for everything from the start."""
    short = _request(1, [5, 6, 7], P=3, new=30)
    long = _request(0, [3 + i % 100 for i in range(200)], P=5, new=40)
    split_engine = _engine(max_prefill_tokens=64)
    split = _run(split_engine, {0: [short], 3: [long]})
    assert len(split_engine.cache.k) >= 2, "the long row added a segment"
    whole_engine = _engine(max_prefill_tokens=64)
    whole_engine.cache.ensure_width(256)
    whole = _run(whole_engine, {0: [short], 3: [long]})
    for rid in ("r0", "r1"):
        _close(split[rid], whole[rid])


def _choice(i: int, leader: str | None, prompt: list[int], seed: int = 0) -> EngineRequest:
    base = _request(0, prompt, P=3)
    params = SamplingParams(max_new_tokens=5, return_logits=True, ignore_eos=True, temperature=1.0, seed=seed)
    return EngineRequest(f"c{i}", base.kind, prompt, base.artifact, params, group=leader)


def test_forked_choices_survive_their_leader_being_cancelled():
    """Choices waiting on a leader's prefill: when the leader is cancelled before its prompt is in, they prefill
    themselves; a waiting choice cancelled itself just leaves. Every remaining choice equals its run alone."""
    prompt = list(range(3, 40))
    leader, waiting, dropped = _choice(0, None, prompt), _choice(1, "c0", prompt, 1), _choice(2, "c0", prompt, 2)
    engine = _engine(max_prefill_tokens=8)  # the leader needs 5 steps to prefill
    mixed = _run(engine, {0: [leader, waiting, dropped]}, cancel_at={1: {"c0", "c2"}})
    assert "c2" not in mixed and len(mixed.get("c0", [])) == 0
    _close(mixed["c1"], _alone(waiting))
    assert not engine.batch.forks and engine.running == 0
    both = _run(_engine(max_prefill_tokens=8), {0: [leader, waiting]})  # the fork itself
    _close(both["c1"], _alone(waiting))
    _close(both["c0"], _alone(leader))
