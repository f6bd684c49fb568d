"""The mixed-prefix attention on tiny tensors, against attention written out by hand per row (keys and values of the
row's prefix at positions 0..P-1 and of its tokens at P + t, grouped-query heads as repeat_kv lays them out): encode
(both ways, padding masked), prefill (causal, right-padded rows, a later chunk reading the earlier ones from the
slot cache), decode (one token per row against the cache in place), sliding windows (the prefix inside the window,
the ring across chunks), soft-cap and sinks; and the guards that make a bypassed or extended attention fail."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from prefix_store import BackboneFingerprint
from service.runtime.attention import (
    ATTN_NAME,
    AttentionBypassed,
    Features,
    ForwardState,
    Mask,
    call_features,
    prefix_serve_attention,
    serving,
)
from service.runtime.kv_cache import PrefixPool, SlotCache

CPU = torch.device("cpu")
LAYERS, H, HKV, D = 2, 4, 2, 8
FP = BackboneFingerprint(
    model_type="llama",
    num_layers=LAYERS,
    hidden_size=H * D,
    num_attention_heads=H,
    num_kv_heads=HKV,
    head_dim=D,
    vocab_size=32,
)
SCALE = D**-0.5
TOL = 1e-5


def reference(q, k, v, qpos, kpos, kvalid, *, causal=True, window=None, softcap=None, sinks=None):
    """One row by hand: q (H, T, D), k and v (H_kv, S, D), positions qpos (T,) and kpos (S,), kvalid (S,) ->
    (T, H, D). Query head h reads key/value head h // (H / H_kv)."""
    G = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)
    scores = q @ k.transpose(1, 2) * SCALE  # (H, T, S)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = kvalid[None].expand(len(qpos), -1).clone()
    if causal:
        allowed &= kpos[None] <= qpos[:, None]
    if window is not None:
        allowed &= kpos[None] > qpos[:, None] - window
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks[:, None, None].expand(-1, len(qpos), 1)], -1)
        probs = torch.softmax(scores, -1)[..., :-1]
    else:
        probs = torch.softmax(scores, -1)
    return (probs @ v).transpose(0, 1)


class Row:
    """One row's history: its prefix (H_kv, P, D) keys and values, and every token key/value fed so far."""

    def __init__(self, P: int, g: torch.Generator) -> None:
        self.pk, self.pv = torch.randn(HKV, P, D, generator=g), torch.randn(HKV, P, D, generator=g)
        self.k = torch.zeros(HKV, 0, D)
        self.v = torch.zeros(HKV, 0, D)

    @property
    def P(self) -> int:
        return self.pk.shape[1]

    def feed(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = torch.cat([self.k, k], 1), torch.cat([self.v, v], 1)

    def expected(self, q: torch.Tensor, **kw) -> torch.Tensor:
        """The row's last q.shape[1] tokens (already fed) attending to its prefix and its tokens."""
        n, T = self.k.shape[1], q.shape[1]
        kpos = torch.arange(self.P + n)
        qpos = self.P + torch.arange(n - T, n)
        keys, values = torch.cat([self.pk, self.k], 1), torch.cat([self.pv, self.v], 1)
        return reference(q, keys, values, qpos, kpos, torch.ones(self.P + n, dtype=torch.bool), **kw)


def setup(rows: list[Row], windows=None) -> tuple[PrefixPool, SlotCache, torch.Tensor, torch.Tensor]:
    """The rows' prefixes in a pool (the same keys/values in every layer), a slot cache, (B, Pmax) indices and (B,)
    lengths."""
    pool = PrefixPool(FP, dtype=torch.float32, device=CPU, max_bytes=1 << 20)
    Pmax = max(r.P for r in rows)
    index = torch.zeros(len(rows), Pmax, dtype=torch.long)
    for b, r in enumerate(rows):
        if r.P:
            idx = pool.alloc(r.P)
            kv = torch.stack([r.pk, r.pv])[None].expand(LAYERS, -1, -1, -1, -1)  # (L, 2, H_kv, P, D)
            pool.write(idx, kv)
            index[b, : r.P] = idx
    cache = SlotCache(FP, rows=len(rows), max_width=64, dtype=torch.float32, device=CPU, windows=windows)
    cache.ensure_width(32)
    return pool, cache, index, torch.tensor([r.P for r in rows])


def padded(xs: list[torch.Tensor], T: int) -> torch.Tensor:
    """Rows (heads, n_b, D) right-padded with noise to (B, heads, T, D): padding must not matter."""
    g = torch.Generator().manual_seed(99)
    return torch.stack([torch.cat([x, 50 * torch.randn(x.shape[0], T - x.shape[1], D, generator=g)], 1) for x in xs])


PLAIN = Features()


def step(state_kw: dict, rows: list[Row], new: list[int], layer: int = 0, f: Features = PLAIN, seed: int = 0):
    """One forward of `new[b]` tokens per row (prefill, or decode when every row feeds one): random q, k, v, fed
    to the rows; returns the attention output (B, T, H, D) and the queries."""
    g = torch.Generator().manual_seed(seed)
    T = max(new)
    qs = [torch.randn(H, n, D, generator=g) for n in new]
    ks = [torch.randn(HKV, n, D, generator=g) for n in new]
    vs = [torch.randn(HKV, n, D, generator=g) for n in new]
    state = ForwardState(new=torch.tensor(new), layers=LAYERS, **state_kw)
    out = state.attend(layer, padded(qs, T), padded(ks, T), padded(vs, T), SCALE, f)
    assert out.shape == (len(rows), T, H, D) and torch.isfinite(out).all(), "padding queries stay finite"
    for r, k, v in zip(rows, ks, vs):
        r.feed(k, v)
    return out, qs


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= TOL


# -- the modes ------------------------------------------------------------------------------------------------------
def test_encode_attends_both_ways_over_the_prefix_and_the_rows_own_tokens():
    g = torch.Generator().manual_seed(0)
    rows = [Row(3, g), Row(0, g), Row(1, g)]
    pool, _, index, plen = setup(rows)
    new = [4, 2, 3]
    out, qs = step(dict(mode="encode", pool=pool, prefix_index=index, prefix_len=plen), rows, new)
    for b, (r, q) in enumerate(zip(rows, qs)):
        n = new[b]
        keys, values = torch.cat([r.pk, r.k], 1), torch.cat([r.pv, r.v], 1)
        pos = torch.arange(r.P + n)
        want = reference(
            q, keys, values, r.P + torch.arange(n), pos, torch.ones(r.P + n, dtype=torch.bool), causal=False
        )
        close(out[b, :n], want)


def test_prefill_chunks_then_decode_match_attention_by_hand():
    """Rows of prefix lengths 3, 0 and 5, prompts of different lengths (right-padded), a second chunk reading the
    first from the slot cache, then two decode steps against the cache in place."""
    g = torch.Generator().manual_seed(1)
    rows = [Row(3, g), Row(0, g), Row(5, g)]
    pool, cache, index, plen = setup(rows)
    common = dict(pool=pool, prefix_index=index, prefix_len=plen, cache=cache)
    slots = torch.tensor([0, 1, 2])
    chunks = [[4, 2, 3], [2, 3, 1]]
    past = torch.zeros(3, dtype=torch.long)
    for i, new in enumerate(chunks):
        out, qs = step(dict(mode="prefill", slots=slots, past=past.clone(), **common), rows, new, seed=10 + i)
        for b, (r, q) in enumerate(zip(rows, qs)):
            close(out[b, : new[b]], r.expected(q))
        past += torch.tensor(new)
    for i in range(2):
        out, qs = step(dict(mode="decode", past=past.clone(), **common), rows, [1, 1, 1], seed=20 + i)
        for b, (r, q) in enumerate(zip(rows, qs)):
            close(out[b], r.expected(q))
        past += 1
    k, _ = cache.gather(0, slots, 8)  # the slot holds the row's 8 tokens at positions 0..7
    close(k[0], rows[0].k)


def test_a_sliding_window_covers_the_prefix_and_the_ring_carries_it_across_chunks():
    """Layer 0 slides over 4 positions: a ring of 4 tokens per slot; queries near the start still see prefix
    positions inside their window, later ones only tokens. Chunks of 5 and 3 (longer than the ring), then decode."""
    W = 4
    g = torch.Generator().manual_seed(2)
    rows = [Row(2, g), Row(0, g)]
    pool, cache, index, plen = setup(rows, windows=(W, None))
    assert cache.ring(0).capacity == W
    common = dict(pool=pool, prefix_index=index, prefix_len=plen, cache=cache)
    f = Features(window=W)
    past = torch.zeros(2, dtype=torch.long)
    for i, new in enumerate([[5, 3], [3, 6]]):
        state = dict(mode="prefill", slots=torch.tensor([0, 1]), past=past.clone(), **common)
        out, qs = step(state, rows, new, f=f, seed=30 + i)
        for b, (r, q) in enumerate(zip(rows, qs)):
            close(out[b, : new[b]], r.expected(q, window=W))
        past += torch.tensor(new)
    for i in range(3):
        out, qs = step(dict(mode="decode", past=past.clone(), **common), rows, [1, 1], f=f, seed=40 + i)
        for b, (r, q) in enumerate(zip(rows, qs)):
            close(out[b], r.expected(q, window=W))
        past += 1
    # the control: the same last step without the window differs
    assert (out[0] - rows[0].expected(qs[0])).abs().max() > 1e-3


def test_soft_cap_and_sinks_as_the_eager_paths_apply_them():
    g = torch.Generator().manual_seed(3)
    rows = [Row(3, g), Row(2, g)]
    pool, cache, index, plen = setup(rows)
    common = dict(pool=pool, prefix_index=index, prefix_len=plen, cache=cache)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    f = Features(softcap=1.5, sinks=sinks)
    out, qs = step(
        dict(mode="prefill", slots=torch.tensor([0, 1]), past=torch.tensor([0, 0]), **common), rows, [3, 4], f=f
    )
    for b, (r, q) in enumerate(zip(rows, qs)):
        close(out[b, : [3, 4][b]], r.expected(q, softcap=1.5, sinks=sinks))
    out, qs = step(dict(mode="decode", past=torch.tensor([3, 4]), **common), rows, [1, 1], f=f, seed=5)
    for b, (r, q) in enumerate(zip(rows, qs)):
        close(out[b], r.expected(q, softcap=1.5, sinks=sinks))
        assert (out[b] - r.expected(q)).abs().max() > 1e-3, "the control: without them the output differs"


# -- masks ----------------------------------------------------------------------------------------------------------
def test_padding_queries_take_their_rows_last_position_and_the_mask_is_shared_by_layers():
    pool = PrefixPool(FP, dtype=torch.float32, device=CPU, max_bytes=1 << 20)
    state = ForwardState(
        "prefill",
        pool,
        torch.zeros(2, 2, dtype=torch.long),
        torch.tensor([2, 0]),
        torch.tensor([3, 1]),
        past=torch.tensor([4, 0]),
        layers=LAYERS,
    )
    assert state._query_positions(3).tolist() == [[6, 7, 8], [0, 0, 0]]
    calls = []

    def layout():
        calls.append(1)
        return state._token_keys(7)

    a = state._mask(("k",), 3, layout, causal=True, window=None)
    assert state._mask(("k",), 3, layout, causal=True, window=None) is a and len(calls) == 1
    # row 1: prefix columns (none real), then slot positions 0..6 of which only 0 is real; every query sees it
    assert a.keep[1].tolist() == [[False, False, True] + [False] * 6] * 3
    bias = Mask(torch.tensor([[[True, False]]])).bias
    assert bias.shape == (1, 1, 1, 1, 2) and bias.flatten().tolist() == [0.0, float("-inf")]


# -- guards ---------------------------------------------------------------------------------------------------------
class SomeAttention:
    layer_idx = 0


def test_call_features_reads_what_it_honours_and_refuses_the_rest():
    s_aux = torch.zeros(H)
    kw = dict(sliding_window=4, softcap=30.0, s_aux=s_aux, scaling=0.5, position_ids=None, dropout=0.0)
    f = call_features(SomeAttention(), None, kw)
    assert f.window == 4 and f.softcap == 30.0 and f.sinks is s_aux
    assert call_features(SomeAttention(), None, dict(sliding_window=None, softcap=0)) == Features()
    for mask, kw, words in [
        (torch.ones(1), {}, "passed its own attention mask"),
        (None, {"attention_chunk": 8, "position_ids": 1}, "does not implement: ['attention_chunk']"),
        (None, {"dropout": 0.1}, "attention dropout 0.1"),
        (None, {"is_causal": False}, "bidirectional attention in a causal model"),
    ]:
        with pytest.raises(AttentionBypassed, match=words.replace("[", r"\[").replace("]", r"\]")):
            call_features(SomeAttention(), mask, kw)


def test_a_layer_run_twice_or_not_at_all_or_past_the_last_fails_the_forward():
    g = torch.Generator().manual_seed(4)
    rows = [Row(1, g)]
    pool, cache, index, plen = setup(rows)
    common = dict(mode="decode", pool=pool, prefix_index=index, prefix_len=plen, cache=cache, past=torch.tensor([0]))
    state = ForwardState(new=torch.tensor([1]), layers=LAYERS, **common)
    q, kv = torch.randn(1, H, 1, D), torch.randn(1, HKV, 1, D)
    state.attend(0, q, kv, kv, SCALE, Features())
    state.attend(0, q, kv, kv, SCALE, Features())
    with pytest.raises(AttentionBypassed, match=r"ran \{0: 2, 1: 0\} times"):
        state.check_complete()
    with pytest.raises(AttentionBypassed, match="the backbone has 2 layers"):
        state.attend(2, q, kv, kv, SCALE, Features())


def test_a_ring_layer_asked_for_another_window_fails():
    g = torch.Generator().manual_seed(5)
    rows = [Row(1, g)]
    pool, cache, index, plen = setup(rows, windows=(4, None))
    state = ForwardState(
        "decode", pool, index, plen, torch.tensor([1]), cache=cache, past=torch.tensor([0]), layers=LAYERS
    )
    q, kv = torch.randn(1, H, 1, D), torch.randn(1, HKV, 1, D)
    with pytest.raises(
        AttentionBypassed, match="keeps a window of 4 tokens but its attention asks for sliding_window=None"
    ):
        state.attend(0, q, kv, kv, SCALE, Features())


def test_serving_routes_the_models_attention_here_for_one_forward_and_checks_it():
    g = torch.Generator().manual_seed(6)
    rows = [Row(2, g)]
    pool, cache, index, plen = setup(rows)
    config = SimpleNamespace(_attn_implementation="sdpa")
    q, kv = torch.randn(1, H, 1, D), torch.randn(1, HKV, 1, D)
    with pytest.raises(AttentionBypassed, match="outside an engine forward"):
        prefix_serve_attention(SomeAttention(), q, kv, kv, None)

    def state() -> ForwardState:
        return ForwardState(
            "decode", pool, index, plen, torch.tensor([1]), cache=cache, past=torch.tensor([0]), layers=LAYERS
        )

    with serving(config, state()):
        assert config._attn_implementation == ATTN_NAME
        for layer in range(LAYERS):
            module = SimpleNamespace(layer_idx=layer)
            out, weights = prefix_serve_attention(module, q, kv, kv, None, scaling=SCALE)
            assert out.shape == (1, 1, H, D) and weights is None
    assert config._attn_implementation == "sdpa"
    with pytest.raises(AttentionBypassed, match=r"ran \{1: 0\} times"):
        with serving(config, state()):
            prefix_serve_attention(SomeAttention(), q, kv, kv, None)
    assert config._attn_implementation == "sdpa", "restored even when the check fails"


def test_task_groups_gather_rows_of_one_prefix_and_hand_each_row_its_own():
    from service.runtime.attention import TaskGroups

    # rows 0 and 2 share a prefix (pool positions 8..10), row 1 has another (4..5), row 3 none
    index = torch.tensor([[8, 9, 10], [4, 5, 0], [8, 9, 10], [0, 0, 0]])
    groups = TaskGroups.of(index, torch.tensor([3, 2, 3, 0]))
    assert groups.index.tolist() == [[8, 9, 10], [4, 5, 0], [0, 0, 0]]
    assert groups.members.tolist() == [[0, 2], [1, 1], [3, 3]]  # padded by repeating a group's first row
    assert groups.row_group.tolist() == [0, 1, 0, 2] and groups.row_slot.tolist() == [0, 0, 1, 0]
    named = TaskGroups.of(index, torch.tensor([3, 2, 3, 0]), [("a", 1), ("b", 1), ("a", 1), None])  # as the engine
    assert named.members.tolist() == groups.members.tolist() and torch.equal(named.index, groups.index)
    x = torch.randn(4, 2, 3, 5)  # (B, H_kv, M, X)
    assert torch.equal(groups.rows(groups.grouped(x)), x)  # grouped then back: every row its own again
    assert not groups.pays(Pmax=128)  # 4 rows in 3 groups: nothing much shared
    assert TaskGroups.of(index[[0, 2, 0, 2]], torch.tensor([3, 3, 3, 3])).pays(Pmax=128)
    assert not TaskGroups.of(index[[0, 2, 0, 2]], torch.tensor([3, 3, 3, 3])).pays(Pmax=16)


@pytest.mark.parametrize("softcap, sinks", [(None, False), (30.0, True)])
def test_grouped_prefix_attention_equals_per_row_with_rows_sharing_tasks(softcap, sinks):
    """Several rows per task, prefixes shorter than the batch's longest, rows without one, grouped-query heads,
    soft-cap and sinks: every row's output grouped by task equals its output with its own gathered prefix."""
    from service.runtime.attention import Features, Mask, TaskGroups, _manual

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, D, S, N = 7, 4, 2, 8, 5, 40  # rows, query heads, key/value heads, head dim, token keys, pool size
    pool_k, pool_v = torch.randn(N, Hkv, D, generator=g), torch.randn(N, Hkv, D, generator=g)
    tasks = {0: [0, 1, 2, 3, 4, 5], 1: [10, 11, 12], 2: [20, 21, 22, 23]}  # pool positions of three prefixes
    owner = [0, 1, 0, None, 2, 0, 1]  # rows 0, 2, 5 share task 0; rows 1, 6 task 1; row 3 has none
    Pmax = max(len(p) for p in tasks.values())
    index = torch.zeros(B, Pmax, dtype=torch.long)
    lens = torch.zeros(B, dtype=torch.long)
    for b, t in enumerate(owner):
        if t is not None:
            index[b, : len(tasks[t])] = torch.tensor(tasks[t])
            lens[b] = len(tasks[t])

    def gather(idx):  # (n, Pmax) -> keys, values (n, H_kv, Pmax, D)
        return pool_k[idx].permute(0, 2, 1, 3), pool_v[idx].permute(0, 2, 1, 3)

    q = torch.randn(B, H, 1, D, generator=g)
    tokens = (torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g))
    keep = torch.cat([torch.arange(Pmax)[None] < lens[:, None], torch.rand(B, S, generator=g) < 0.7], 1)
    keep[:, Pmax] = True  # every row sees at least one key
    mask = Mask(keep[:, None, :])  # (B, T=1, Pmax + S)
    f = Features(softcap=softcap, sinks=torch.randn(H, generator=g) if sinks else None)
    groups = TaskGroups.of(index, lens)
    assert groups.members.shape == (4, 3)  # three tasks and the prefix-less row; the largest group has 3 rows
    per_row = _manual(q, [gather(index), tokens], mask, 0.3, f)
    grouped = _manual(q, [gather(groups.index), tokens], mask, 0.3, f, groups)
    assert (grouped - per_row).abs().max().item() <= 1e-6


def test_grouping_is_chosen_only_where_it_pays():
    from service.runtime.attention import TaskGroups

    def groups(sizes):  # rows per task, each task its own prefix of 128 positions
        index = torch.cat([torch.full((n, 128), 128 * t) for t, n in enumerate(sizes)])
        return TaskGroups.of(index, torch.full((index.shape[0],), 128))

    assert groups([16, 16, 16, 16]).pays(128)
    assert not groups([16, 16, 16, 16]).pays(32)  # short prefixes: the per-row gather is as fast
    assert not groups([1] * 64).pays(128)  # nothing shared
    assert not groups([200] + [1] * 56).pays(128)  # one big group pads 56 single rows to 200 query slots each
