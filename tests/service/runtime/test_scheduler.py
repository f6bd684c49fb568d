"""Scheduler and engine behaviour on a tiny Llama over a real Redis: continuous batching, budgets, fairness,
cancellation, sampling controls, version pinning and cache invalidation by store events."""

import asyncio
import copy
import time

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig

from prefix_store import BackboneFingerprint, BackboneMismatch, StoreUnavailable, TaskNotFound, connect
from service.http_errors import headers_of
from service.runtime import InputTooLong, QueueFull, SamplingParams, Unsupported
from tests.engine_harness import publish_peft, serving_stack, trained_peft
from tests.factories import make_artifact
from tests.models import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.redis


@pytest.fixture
def llama():
    return tiny_model("llama")


async def _publish(store, base, tmp_path, task, P=4, seed=1, cls=PrefixTuningConfig):
    pm = trained_peft(base, cls(task_type="CAUSAL_LM", num_virtual_tokens=P), seed=seed)
    return await publish_peft(store, pm, task, base.config, tmp_path / f"{task}-{seed}")


def greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)


async def test_queue_bound_fails_fast(store, llama, tmp_path):
    await _publish(store, llama, tmp_path, "a")
    async with serving_stack(store, copy.deepcopy(llama), max_queue=2) as stack:
        stack.scheduler.submit("a", [5, 6], greedy(2))
        stack.scheduler.submit("a", [5, 6], greedy(2))
        with pytest.raises(QueueFull, match=r"2 requests waiting \(limit 2\)") as e:
            stack.scheduler.submit("a", [5, 6], greedy(2))
        assert e.value.retry_after_s == 1 and headers_of(e.value) == {"Retry-After": "1"}


async def test_cancel_frees_the_row_at_the_next_step(store, llama, tmp_path):
    await _publish(store, llama, tmp_path, "a")
    async with serving_stack(store, copy.deepcopy(llama)) as stack:
        h = stack.scheduler.submit("a", [5, 6, 7], greedy(200))
        seen = []
        async for ev in h.events():
            seen.append(ev)
            if len(seen) == 3:
                h.cancel()
        assert seen[-1].finish_reason == "cancelled" and len(seen) < 10
        assert stack.engine.running == 0 and stack.scheduler.running == 0


async def test_fair_across_tasks(store, llama, tmp_path):
    await _publish(store, llama, tmp_path, "hot")
    await _publish(store, llama, tmp_path, "cold", seed=2)
    async with serving_stack(store, copy.deepcopy(llama), max_batch_size=2) as stack:
        await stack.scheduler.submit("cold", [3], greedy(1)).result()  # both prefixes cached: no load latency
        await stack.scheduler.submit("hot", [3], greedy(1)).result()
        hot = [stack.scheduler.submit("hot", [5, 6], greedy(4)) for _ in range(8)]
        cold = stack.scheduler.submit("cold", [5, 6], greedy(4))
        first_step = {}
        for name, h in [(f"hot{i}", h) for i, h in enumerate(hot)] + [("cold", cold)]:
            async for ev in h.events():
                first_step.setdefault(name, ev.step)
    # With two rows, round-robin admits cold in the first wave next to hot0, not after eight hot requests.
    assert first_step["cold"] == first_step["hot0"] < first_step["hot2"]


async def test_token_budget_bounds_running_rows(store, llama, tmp_path):
    await _publish(store, llama, tmp_path, "a", P=4)
    # Each request reserves 4 + 3 + 5 = 12 key/value columns; a budget of 20 fits one row at a time.
    async with serving_stack(store, copy.deepcopy(llama), max_batch_tokens=20) as stack:
        peak = 0
        handles = [stack.scheduler.submit("a", [5, 6, 7], greedy(5)) for _ in range(4)]

        async def watch():
            nonlocal peak
            while not all(h._req.done for h in handles):
                peak = max(peak, stack.engine.running)
                await asyncio.sleep(0)

        results, _ = await asyncio.gather(asyncio.gather(*(h.result() for h in handles)), watch())
        assert peak == 1 and all(r.completion_tokens == 5 for r in results)
        with pytest.raises(InputTooLong, match="batch budget is 20"):
            await stack.scheduler.submit("a", list(range(3, 20)), greedy(5)).result()


async def test_context_window_and_unsupported_requests(store, llama, tmp_path):
    await _publish(store, llama, tmp_path, "a", P=4)
    async with serving_stack(store, copy.deepcopy(llama)) as stack:
        with pytest.raises(
            InputTooLong,
            match=r"prefix \(4\) \+ prompt \(200\) \+ max new tokens \(60\) = 264 "
            r"exceeds the context window of 256",
        ):
            await stack.scheduler.submit("a", [5] * 200, greedy(60)).result()
        with pytest.raises(Unsupported, match="no classification head"):
            await stack.scheduler.submit("a", [5, 6]).result()
        with pytest.raises(TaskNotFound):
            await stack.scheduler.submit("missing", [5, 6], greedy(2)).result()
        with pytest.raises(InputTooLong, match="empty"):
            stack.scheduler.submit("a", [], greedy(2))
        await store.put(make_artifact("alien", fp=BackboneFingerprint("llama", 3, 64, 8, 4, 8, 128)))
        with pytest.raises(BackboneMismatch, match="num_kv_heads: prefix has 4, backbone has 2"):
            await stack.scheduler.submit("alien", [5, 6], greedy(2)).result()
    bert = tiny_model("bert-cls").bert
    async with serving_stack(store, bert) as stack:
        with pytest.raises(Unsupported, match="encoder"):
            stack.scheduler.submit(None, [5, 6], greedy(2))


async def test_stops_logprobs_and_streamed_text(store, llama, tmp_path):
    await _publish(store, llama, tmp_path, "a")
    tok = tiny_tokenizer()
    async with serving_stack(store, copy.deepcopy(llama), tokenizer=tok) as stack:
        s = stack.scheduler
        free = await s.submit("a", [5, 6, 7], greedy(12, logprobs=True)).result()
        assert free.finish_reason == "length" and len(free.token_ids) == 12
        assert len(free.logprobs) == 12 and all(lp <= 0 for lp in free.logprobs)
        assert free.text == tok.decode(free.token_ids)

        ids = free.token_ids
        stop_id = ids[2]
        cut = ids.index(stop_id)
        by_id = await s.submit("a", [5, 6, 7], greedy(12, stop_token_ids=[stop_id])).result()
        assert by_id.finish_reason == "stop" and by_id.token_ids == ids[: cut + 1]
        assert by_id.text == tok.decode(ids[:cut])  # the stop token is not part of the text

        word = tok.decode([ids[4]])
        handle = s.submit("a", [5, 6, 7], greedy(12, stop=[word]))
        deltas = [ev.text async for ev in handle.events()]
        expected = tok.decode(ids)
        expected = expected[: expected.find(word)]
        assert "".join(deltas) == expected and word not in "".join(deltas)

        eos = SamplingParams(max_new_tokens=12)  # EOS is honoured unless ignore_eos
        stack.engine.eos_ids = {ids[1]}
        stopped = await s.submit("a", [5, 6, 7], eos).result()
        assert stopped.finish_reason == "stop" and stopped.token_ids == ids[: ids.index(ids[1]) + 1]


async def test_requests_finish_on_the_version_they_started_with(store, llama, tmp_path):
    v1 = await _publish(store, llama, tmp_path, "t", P=3, seed=1)
    async with serving_stack(store, copy.deepcopy(llama)) as stack:
        s = stack.scheduler
        alone_v1 = await s.submit("t", [5, 6, 7], greedy(8)).result()
        running = s.submit("t", [5, 6, 7], greedy(8))
        events = [ev async for ev in _take(running, 2)]
        v2 = await _publish(store, llama, tmp_path, "t", P=5, seed=2)
        rest = [ev async for ev in running.events()]
        assert running.version == v1.version == 1
        assert [e.token_id for e in events + rest] == alone_v1.token_ids  # finished on v1 after v2 was published
        await _until(lambda: stack.cache.current.get("t") == v2.version)
        after = await s.submit("t", [5, 6, 7], greedy(8)).result()
        assert after.version == 2

        await store.rollback("t", 1)
        await _until(lambda: stack.cache.current.get("t") == 1)
        assert (await s.submit("t", [5, 6, 7], greedy(8)).result()).token_ids == alone_v1.token_ids

        await store.delete("t")
        await _until(lambda: "t" not in stack.cache.current)
        with pytest.raises(TaskNotFound):
            await s.submit("t", [5, 6, 7], greedy(2)).result()
        assert not any(k[0] == "t" for k in stack.cache.lru.entries)
        await s.submit(None, [5], greedy(1)).result()  # the next step applies the device-tier invalidation
        assert not any(k[0] == "t" for k in stack.engine.device_cache.entries)


async def test_a_slow_prefix_load_does_not_stall_running_rows(store, redis_url, llama, tmp_path):
    await _publish(store, llama, tmp_path, "warm")
    await _publish(store, llama, tmp_path, "cold", seed=2, cls=PromptTuningConfig)
    admin = connect(redis_url)
    async with serving_stack(store, copy.deepcopy(llama)) as stack:
        s = stack.scheduler
        await s.submit("warm", [3], greedy(1)).result()
        running = s.submit("warm", [5, 6], greedy(150))
        await _take(running, 1).__anext__()
        blocker = asyncio.create_task(admin.execute_command("DEBUG", "SLEEP", "1.0"))  # Redis stalls for 1 s
        await asyncio.sleep(0.05)
        cold = s.submit("cold", [5, 6], greedy(2))
        t0, during = time.monotonic(), 0
        async for _ in running.events():
            if time.monotonic() - t0 < 0.8:
                during += 1
        await blocker
        assert during >= 5, "decode kept going while the store was stalled"
        assert (await cold.result()).completion_tokens == 2
    await admin.aclose()


async def test_store_down_for_an_uncached_task(llama):
    from prefix_store import PrefixStore

    dead = PrefixStore(connect("redis://127.0.0.1:1", socket_timeout=0.2), read_retries=1, retry_backoff_s=0.01)
    backbone_model = copy.deepcopy(llama)
    from service.runtime import Engine, HostCache, Scheduler, wrap_model

    cache = HostCache(dead)
    scheduler = Scheduler(Engine(wrap_model(backbone_model, None, name="t")), cache)
    scheduler.start()
    try:
        with pytest.raises(StoreUnavailable):
            await scheduler.submit("x", [5], greedy(1)).result()
        assert (await scheduler.submit(None, [5], greedy(2)).result()).completion_tokens == 2  # bare still serves
    finally:
        await scheduler.stop()
        await dead.aclose()


async def test_cache_tiers_count_hits_misses_evictions(store, llama, tmp_path):
    for i in range(3):
        await _publish(store, llama, tmp_path, f"t{i}", P=4, seed=i)
    one_prefix = 3 * 2 * 2 * 4 * 8 * 4  # L * 2 * H_kv * P * D * fp32 bytes
    async with serving_stack(store, copy.deepcopy(llama)) as stack:
        stack.engine.pool.max_blocks = 2  # room for two prefixes of P = 4 (one pool block each)
        for task in ["t0", "t1", "t0", "t2", "t1"]:
            await stack.scheduler.submit(task, [5], greedy(1)).result()
        dev = stack.engine.device_cache
        assert dev.stats == {"hits": 1, "misses": 4, "evictions": 2}
        assert dev.resident_bytes == 2 * one_prefix and len(dev.entries) == 2
        assert stack.cache.lru.stats["misses"] == 3 and stack.cache.lru.stats["hits"] == 2


async def _take(handle, n):
    i = 0
    async for ev in handle.events():
        yield ev
        i += 1
        if i == n:
            return


async def _until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_bfloat16_backbone_serves_prefixes(store, llama, tmp_path):
    """Artifacts are stored in fp32 and cast to the backbone's dtype when they are materialised."""
    await _publish(store, llama, tmp_path, "a")
    await _publish(store, llama, tmp_path, "soft", cls=PromptTuningConfig)
    model = copy.deepcopy(llama).to(torch.bfloat16)
    async with serving_stack(store, model) as stack:
        results = await asyncio.gather(
            *(stack.scheduler.submit(t, [5, 6, 7], greedy(4)).result() for t in ("a", "soft", None))
        )
        assert all(r.completion_tokens == 4 for r in results)
        assert stack.engine.pool.data.dtype == torch.bfloat16 and len(stack.engine.device_cache.entries) == 2


async def test_rows_submitted_together_share_one_forward(store):
    """Image rows of several tasks (held by the host tier) and bare rows, submitted in one go, are admitted in one
    step, and each equals its reference: the scheduler mixes tasks in a batch, whatever order they resolve in."""
    from tests.service.runtime.test_vpt import case, reference

    vit, arts, images = case()
    for art in arts:
        await store.put(art)
    async with serving_stack(store, copy.deepcopy(vit)) as stack:
        for i, art in enumerate(arts):  # every version loaded first: the rows can then share a forward
            await stack.scheduler.submit(art.task, [], pixel_values=images[i]).result()
        handles = [stack.scheduler.submit(a.task, [], pixel_values=images[i]) for i, a in enumerate(arts)]
        handles += [stack.scheduler.submit(None, [], pixel_values=img, embed=True) for img in images[:2]]
        outs = await asyncio.gather(*(anext(aiter(h.events())) for h in handles))
    assert len({o.step for o in outs}) == 1, "the rows shared one forward"
    for art, img, out in zip(arts, images, outs):
        assert (out.logits - reference(vit, img, art)).abs().max().item() <= 1e-5
    for img, out in zip(images[:2], outs[len(arts) :]):
        want = torch.nn.functional.normalize(reference(vit, img, None), dim=0)
        assert (out.embedding - want).abs().max().item() <= 1e-5


async def test_a_lookup_cancelled_mid_call_ends_every_request_of_the_call(store, llama):
    """A call's task lookup that is cancelled (the service stopping) ends each of its requests as cancelled and frees
    their places in the queue: none is left waiting for a lookup that will never come."""
    from service.runtime import Submission

    class Cancelling:  # the host tier, its lookup cancelled
        def peek(self, task, version=None):
            return None

        async def get(self, task, version=None):
            raise asyncio.CancelledError

    async with serving_stack(store, llama, tiny_tokenizer()) as stack:
        sched = stack.scheduler
        real, sched.host_cache = sched.host_cache, Cancelling()
        try:
            handles = sched.submit_all([Submission([5, 6], "a", greedy(2)), Submission([7], "b", greedy(2))])
            finals = [[e async for e in h.events()][-1] for h in handles]
        finally:
            sched.host_cache = real
        assert [f.finish_reason.value for f in finals] == ["cancelled", "cancelled"]
        assert sched._waiting == 0 and not sched._live


async def test_high_priority_is_admitted_ahead_of_earlier_low_requests(store, llama):
    """One row, busy: three low requests queue, then one high. The high one takes the row next, before the low ones
    queued ahead of it; the low ones then keep their own order."""
    async with serving_stack(store, copy.deepcopy(llama), max_batch_size=1) as stack:
        sched = stack.scheduler
        busy = sched.submit(None, [5, 6], greedy(8))
        await anext(aiter(busy.events()))  # admitted: the row is taken
        low = [sched.submit(None, [5, 6], greedy(2), priority="low", client=f"c{i}") for i in range(3)]
        high = sched.submit(None, [7, 8], greedy(2), priority="high")
        first = {}
        for name, h in [("high", high)] + [(f"low{i}", h) for i, h in enumerate(low)]:
            async for ev in h.events():
                first.setdefault(name, ev.step)
        await busy.result()
    assert first["high"] < first["low0"] < first["low1"] < first["low2"], first


async def test_a_full_queue_displaces_the_newest_lower_class_requests(store, llama):
    """max_queue 4, one row: a busy low row and four queued low requests fill the queue. A high request takes the
    place of the newest low one, which ends with the queue-full error (429 with Retry-After over HTTP), as if it had
    been refused at arrival; a low request is refused as before, and a request never displaces its own class."""
    from service.runtime import Submission

    async with serving_stack(store, copy.deepcopy(llama), max_batch_size=1, max_queue=4) as stack:
        sched = stack.scheduler
        busy = sched.submit(None, [5, 6], greedy(30), priority="low")
        await anext(aiter(busy.events()))  # admitted: the row is taken
        low = [sched.submit(None, [5, 6], greedy(2), priority="low", client=f"c{i}") for i in range(4)]
        with pytest.raises(QueueFull, match=r"4 requests waiting \(limit 4\)"):
            sched.submit(None, [5], greedy(1), priority="low")  # its own class: refused, nothing displaced
        assert sched.queue_depth == 4 and not any(h._req.done for h in low)

        high = sched.submit(None, [7, 8], greedy(2), priority="high")
        assert sched.queue_depth == 4 and low[3]._req.done and not any(h._req.done for h in low[:3])
        with pytest.raises(QueueFull, match="a high-priority request took the place of this low-priority one") as e:
            await low[3].result()
        assert headers_of(e.value) == {"Retry-After": "1"}

        # A call of two normal requests needs two places: only three low ones are left, the newest two go.
        pair = sched.submit_all([Submission([9], None, greedy(1)), Submission([9, 9], None, greedy(1))])
        assert low[2]._req.done and low[1]._req.done and not low[0]._req.done and sched.queue_depth == 4
        # Two more high ones: one low left, the normal ones are not below normal, so a normal call is refused whole.
        with pytest.raises(QueueFull, match="this call adds 2"):
            sched.submit_all([Submission([9], None, greedy(1))] * 2)
        assert not low[0]._req.done and sched.queue_depth == 4
        first = {}
        for name, h in [("high", high), ("pair0", pair[0]), ("pair1", pair[1]), ("low0", low[0])]:
            async for ev in h.events():
                first.setdefault(name, ev.step)
        await busy.result()
    assert first["high"] < first["pair0"] <= first["pair1"] < first["low0"], first


async def test_a_blocked_high_request_holds_the_key_value_room_against_low_ones(store, llama):
    """The key/value budget is the limit (24 columns): three staggered low rows of 8 columns each fill it and 12 low
    requests of 8 columns wait, then a high request of 17 columns arrives. Each finishing low row frees 8 columns,
    which would fit the next low request every time; they are held for the high request instead, so it starts as
    soon as the three running rows are done, before any of the low requests queued ahead of it."""
    async with serving_stack(store, copy.deepcopy(llama), max_batch_tokens=24) as stack:
        sched = stack.scheduler
        running = []
        for i in range(3):  # one step apart: they finish one after another
            running.append(sched.submit(None, [5, 6], greedy(6), priority="low", client=f"r{i}"))
            await anext(aiter(running[-1].events()))
        queued = [sched.submit(None, [5, 6], greedy(6), priority="low", client=f"q{i % 4}") for i in range(12)]
        high = sched.submit(None, [7, 8], greedy(15), priority="high")  # 2 + 15 = 17 columns
        assert sched.running == 3 and sched.reserved_tokens == 24, "the three low rows still run"
        first = {}
        for name, h in (
            [("high", high)]
            + [(f"q{i}", h) for i, h in enumerate(queued)]
            + [(f"r{i}", h) for i, h in enumerate(running)]
        ):
            async for ev in h.events():
                first.setdefault(name, ev.step)
    assert first["high"] < min(first[f"q{i}"] for i in range(12)), first


async def test_a_high_request_s_prefix_loads_while_low_requests_hold_the_free_rows(store, llama, tmp_path):
    """Four rows, 50 key/value columns: a long low row takes 46, so three queued low requests (12 columns each) have
    their prefix held for the three free rows while they wait for columns. A high request of another task arrives:
    its prefix is loaded at once (holds of a lower class do not count against it), so it starts no later than the
    low requests once the long row ends, never a step after them."""
    await _publish(store, llama, tmp_path, "lo", P=4)
    await _publish(store, llama, tmp_path, "hi", P=4, seed=2)
    async with serving_stack(store, copy.deepcopy(llama), max_batch_size=4, max_batch_tokens=50) as stack:
        sched = stack.scheduler
        long = sched.submit("lo", [5, 6], greedy(40), priority="low")  # 4 + 2 + 40 = 46 columns
        await anext(aiter(long.events()))
        lows = [sched.submit("lo", [5, 6], greedy(6), priority="low", client=f"c{i}") for i in range(3)]
        await _until(lambda: all(h._req.held for h in lows))
        high = sched.submit("hi", [7, 8], greedy(4), priority="high")  # 4 + 2 + 4 = 10 columns
        await _until(lambda: high._req.held)
        assert not long._req.done, "loaded while the long row still runs"
        first = {}
        for name, h in [("high", high)] + [(f"low{i}", h) for i, h in enumerate(lows)]:
            async for ev in h.events():
                first.setdefault(name, ev.step)
        await long.result()
    assert first["high"] <= min(first[f"low{i}"] for i in range(3)), first
