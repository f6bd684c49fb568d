"""The device memory for key/values, on tiny tensors whose values name their place: the prefix pool (blocks handed
out, grown by doubling up to the budget, released and reused, written and gathered per layer), the slot cache (rows
written in place across segments, decoded, gathered, moved and swapped, segments added and dropped) and the rings of
sliding-window layers (a row's last C tokens at t mod C, resized in place)."""

from __future__ import annotations

import torch

from prefix_store import BackboneFingerprint
from service.runtime.kv_cache import BLOCK, PrefixPool, SlotCache

CPU = torch.device("cpu")
L, H, D = 3, 2, 4
FP = BackboneFingerprint(
    model_type="llama", num_layers=L, hidden_size=16, num_attention_heads=4, num_kv_heads=H, head_dim=D, vocab_size=32
)
TOKEN_BYTES = 2 * L * H * D * 4  # keys and values of every layer, fp32


def pool(blocks: int) -> PrefixPool:
    return PrefixPool(FP, dtype=torch.float32, device=CPU, max_bytes=blocks * BLOCK * TOKEN_BYTES)


def prefix(P: int, base: float) -> torch.Tensor:
    """(L, 2, H, P, D): value = base + a number unique to (layer, k/v, head, position, dim)."""
    return base + torch.arange(L * 2 * H * P * D, dtype=torch.float32).view(L, 2, H, P, D)


# -- prefix pool ---------------------------------------------------------------------------------------------------
def test_pool_hands_out_whole_blocks_and_grows_by_doubling_up_to_its_budget():
    p = pool(6)
    assert p.token_bytes == TOKEN_BYTES and p.max_blocks == 6 and p.capacity_blocks == 0 and p.free_blocks == 6
    a = p.alloc(5)  # 2 blocks: the pool grows to 4
    assert a.tolist() == [0, 1, 2, 3, 4] and p.capacity_blocks == 4 and p.free_blocks == 4
    assert p.used_bytes == 2 * BLOCK * TOKEN_BYTES
    b = p.alloc(2 * BLOCK)  # the last 2 blocks of the first 4
    assert b.tolist() == list(range(2 * BLOCK, 4 * BLOCK)) and p.capacity_blocks == 4
    c = p.alloc(1)  # grows again, capped by the budget: 6 blocks, not 8
    assert c.tolist() == [4 * BLOCK] and p.capacity_blocks == 6 and p.data.shape == (L, 2, 6 * BLOCK, H, D)
    assert p.free_blocks == 1
    assert p.alloc(BLOCK + 1) is None, "2 blocks do not fit in the 1 left: the caller evicts"
    assert p.capacity_blocks == 6 and p.free_blocks == 1


def test_released_blocks_are_reused_and_growing_keeps_what_was_written():
    p = pool(8)
    a = p.alloc(3)
    kv = prefix(3, 100.0)
    p.write(a, kv)
    b = p.alloc(4 * BLOCK)  # past the first 4 blocks: the data is copied into a grown tensor
    assert p.capacity_blocks == 8
    k, v = p.gather(2, a[None])
    assert torch.equal(k[0], kv[2, 0]) and torch.equal(v[0], kv[2, 1]), "written keys survived the growth"
    p.release(a)
    assert p.free_blocks == 8 - 4
    again = p.alloc(4 * BLOCK)  # every free block, the released one among them
    assert set(range(BLOCK)) <= set(again.tolist()) and p.free_blocks == 0
    assert p.alloc(1) is None
    p.release(b)
    assert p.used_bytes == 4 * BLOCK * TOKEN_BYTES and p.free_blocks == 4


def test_pool_gathers_each_rows_prefix_per_layer():
    """Two prefixes of different lengths gathered as a batch (B, Pmax): each row reads its own positions."""
    p = pool(8)
    a, b = p.alloc(2), p.alloc(5)
    ka, kb = prefix(2, 0.0), prefix(5, 1000.0)
    p.write(a, ka)
    p.write(b, kb)
    index = torch.stack([torch.cat([a, a[:1].repeat(3)]), b])  # row 0 padded with a position of its own
    for layer in range(L):
        k, v = p.gather(layer, index)
        assert k.shape == (2, H, 5, D) and k.is_contiguous()
        assert torch.equal(k[0, :, :2], ka[layer, 0]) and torch.equal(v[0, :, :2], ka[layer, 1])
        assert torch.equal(k[1], kb[layer, 0]) and torch.equal(v[1], kb[layer, 1])


# -- slot cache: full layers ---------------------------------------------------------------------------------------
def kv_tokens(B: int, T: int, base: float) -> torch.Tensor:
    """(B, H, T, D): value = base + 100 * row + 10 * token + head + dim / 10."""
    b = torch.arange(B)[:, None, None, None] * 100.0
    t = torch.arange(T)[None, None, :, None] * 10.0
    h = torch.arange(H)[None, :, None, None] * 1.0
    d = torch.arange(D)[None, None, None, :] / 10.0
    return base + b + t + h + d


def test_segments_are_added_to_the_need_in_multiples_of_16_and_dropped_from_the_end():
    c = SlotCache(FP, rows=3, max_width=256, dtype=torch.float32, device=CPU)
    assert c.width == 0 and c.nbytes == 0
    c.ensure_width(5)
    assert c.starts == [0] and c.width == 16 and c.k[0].shape == (L, 3, H, 16, D)
    c.ensure_width(16)
    assert c.starts == [0], "already wide enough: nothing added"
    c.ensure_width(20)  # at least half the width (8), rounded up to 16
    assert c.starts == [0, 16] and c.width == 32
    c.ensure_width(70)  # the need: 38 more, rounded up to 48
    assert c.starts == [0, 16, 32] and c.width == 80
    assert c.nbytes == 2 * L * 3 * H * 80 * D * 4
    c.shrink(20)  # segments starting at or past 20 go
    assert c.starts == [0, 16] and c.width == 32
    c.shrink(0)
    assert c.starts == [] and c.width == 0


def test_rows_are_written_in_place_across_segments_and_gathered_back():
    c = SlotCache(FP, rows=4, max_width=256, dtype=torch.float32, device=CPU)
    c.ensure_width(16)
    c.ensure_width(32)  # positions 0..15 and 16..31 in two segments
    slots, past = torch.tensor([2, 0]), torch.tensor([12, 0])
    k, v = kv_tokens(2, 6, 0.0), kv_tokens(2, 6, 0.5)
    c.write(1, slots, past, k, v)  # slot 2 gets positions 12..17 (across the boundary), slot 0 gets 0..5
    assert torch.equal(c.k[0][1, 2, :, 12:16], k[0, :, :4]) and torch.equal(c.k[1][1, 2, :, 0:2], k[0, :, 4:])
    assert torch.equal(c.v[0][1, 0, :, 0:6], v[1])
    assert not c.k[0][0].any() and not c.k[0][2].any(), "other layers untouched"
    gk, gv = c.gather(1, torch.tensor([2, 0]), 18)
    assert gk.shape == (2, H, 18, D)
    assert torch.equal(gk[0, :, 12:18], k[0]) and torch.equal(gv[1, :, :6], v[1])
    assert not gk[0, :, :12].any(), "positions never written are zeros"


def test_decode_writes_one_token_per_slot_and_its_parts_are_views():
    c = SlotCache(FP, rows=4, max_width=256, dtype=torch.float32, device=CPU)
    c.ensure_width(16)
    c.ensure_width(32)
    k = torch.stack([torch.full((H, 1, D), 7.0), torch.full((H, 1, D), 8.0), torch.full((H, 1, D), 9.0)])
    c.write_decode(0, 3, torch.tensor([3, 15, 16]), k, -k)  # slots 0..2; slot 2's token in the second segment
    assert (c.k[0][0, 0, :, 3] == 7).all() and (c.k[0][0, 1, :, 15] == 8).all() and (c.k[1][0, 2, :, 0] == 9).all()
    assert (c.v[1][0, 2, :, 0] == -9).all()
    parts = c.decode_parts(0, 3, 17)
    assert [pk.shape for pk, _ in parts] == [(3, H, 16, D), (3, H, 1, D)]
    parts[0][0][0, 0, 3, 0] = 42.0
    assert c.k[0][0, 0, 0, 3, 0] == 42.0, "a view into the cache, not a copy"
    c.write_decode(0, 2, torch.tensor([4, 5]), k[:2], k[:2])  # one segment: the fast path
    assert (c.k[0][0, 0, :, 4] == 7).all() and (c.k[0][0, 1, :, 5] == 8).all()


def test_move_and_swap_carry_every_layer_of_a_row():
    c = SlotCache(FP, rows=3, max_width=256, dtype=torch.float32, device=CPU)
    c.ensure_width(16)
    for layer in range(L):
        c.write(layer, torch.tensor([0, 1]), torch.tensor([0, 0]), kv_tokens(2, 5, layer), kv_tokens(2, 5, -layer))
    before = [c.gather(layer, torch.tensor([0, 1]), 5) for layer in range(L)]
    c.swap(0, 1, 5, 5)
    for layer in range(L):
        k, v = c.gather(layer, torch.tensor([1, 0]), 5)
        assert torch.equal(k, before[layer][0]) and torch.equal(v, before[layer][1])
    c.move(1, 2, 3)  # slot 1 holds what slot 0 held: its first 3 tokens are copied to slot 2
    k, _ = c.gather(2, torch.tensor([2]), 5)
    assert torch.equal(k[0, :, :3], before[2][0][0, :, :3]) and not k[0, :, 3:].any()


# -- slot cache: sliding-window layers -----------------------------------------------------------------------------
def test_windows_as_wide_as_the_context_keep_every_token():
    c = SlotCache(FP, rows=2, max_width=8, dtype=torch.float32, device=CPU, windows=(4, 8, None))
    assert c.windows == (4, None, None) and c.full_layers == [1, 2] and set(c.rings) == {4}
    assert c.window(0) == 4 and c.window(1) is None


def test_a_ring_holds_a_rows_last_tokens_at_t_mod_c():
    c = SlotCache(FP, rows=2, max_width=64, dtype=torch.float32, device=CPU, windows=(5, None, 5))
    c.ensure_width(3)
    ring = c.ring(0)
    assert ring.capacity == 5 and ring.k.shape == (2, 2, H, 5, D), "two layers share the window-5 ring"
    assert c.k[0].shape[0] == 1, "only the full layer keeps a segment"
    # slot 1: a 7-token chunk (tokens 0..6) padded to 8; only the last 5 real ones are kept, at t mod 5
    k = kv_tokens(1, 8, 0.0)
    c.ring_write(2, torch.tensor([1]), torch.tensor([0]), torch.tensor([7]), k, -k)
    ring_k, ring_v = c.ring_gather(2, torch.tensor([1]))
    for t in range(2, 7):
        assert torch.equal(ring_k[0, :, t % 5], k[0, :, t]) and torch.equal(ring_v[0, :, t % 5], -k[0, :, t])
    assert not c.rings[5].k[0].any(), "layer 0's ring untouched"
    assert not c.rings[5].k[1, 0].any(), "slot 0 untouched"
    # decode: token 7 of slot 1 (and token 0 of slot 0) at 7 mod 5 = 2 and 0
    new = torch.stack([torch.full((H, 1, D), 5.0), torch.full((H, 1, D), 6.0)])
    c.ring_write_decode(2, 2, torch.tensor([0, 7]), new, new)
    view_k, _ = c.ring_view(2, 2)
    assert (view_k[0, :, 0] == 5).all() and (view_k[1, :, 2] == 6).all()
    assert torch.equal(view_k[1, :, 3], k[0, :, 3]), "the rest of the ring as it was"


def test_a_ring_grows_with_the_width_up_to_its_window_keeping_its_positions():
    c = SlotCache(FP, rows=1, max_width=256, dtype=torch.float32, device=CPU, windows=(None, 40, None))
    c.ensure_width(4)  # width 16: the ring holds 16 positions, not 40
    assert c.ring(1).capacity == 16
    k = kv_tokens(1, 10, 0.0)
    c.ring_write(1, torch.tensor([0]), torch.tensor([0]), torch.tensor([10]), k, k)
    c.ensure_width(30)  # width 32
    assert c.ring(1).capacity == 32
    c.ensure_width(100)
    assert c.ring(1).capacity == 40, "never more than the window"
    ring_k, _ = c.ring_view(1, 1)
    assert torch.equal(ring_k[0, :, :10], k[0]) and not ring_k[0, :, 10:].any()
    assert c.rings[40].nbytes == 2 * 1 * 1 * H * 40 * D * 4
    c.shrink(16)  # width back to 16: the ring follows, positions 0..15 kept
    assert c.width == 16 and c.ring(1).capacity == 16
    assert torch.equal(c.ring_view(1, 1)[0][0, :, :10], k[0])
