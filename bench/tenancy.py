"""Many tasks, many teams: what a shared server promises each of them, measured through the HTTP API of a real app
(create_app: lifespan, routes, Call, host cache, scheduler, engine) in this process over the ASGI transport, on an
embedded Redis and a random tiny Llama (weights do not change what is measured here).

  split     a 50/50 traffic split between two versions of one task, then `--requests` unpinned requests with
            distinct X-Request-IDs: the fraction each version served (goal: each within 45-55%), and the same ids
            sent again land on the same versions (a retry keeps its version)
  priority  priority `high` requests keep their latency while `low` ones saturate the server: `--flood-keys` low
            keys (as many tenants) flood the queue with `--flood` requests of 1..2 x `--flood-new` tokens, far more
            than `--batch` rows, and while they wait, a `high` key and, as the control, another `low` key each send
            `--probes` requests one after another: their median latency under the flood against the same requests
            on an idle server. Admission has no preemption, so a high request still waits for the next row to free
            up and runs in a full batch: what it never waits for is the queue; the control waits its turn among the
            flooding keys (round-robin within its class).

    python bench/tenancy.py                  # every scenario
    python bench/tenancy.py --only split --requests 1000
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prefix_store import BackboneFingerprint, PrefixArtifact
from service.app import create_app
from service.runtime import wrap_model
from service.settings import ServiceSettings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--requests", type=int, default=1000, help="unpinned requests of the split scenario")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    p.add_argument("--new", type=int, default=1, help="max_new_tokens of each request")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--prefix", type=int, default=8, help="virtual tokens of each task version")
    p.add_argument("--flood", type=int, default=512, help="low-priority requests queued at once (priority)")
    p.add_argument("--flood-keys", type=int, default=32, help="low-priority keys the flood comes from (priority)")
    p.add_argument("--probes", type=int, default=20, help="requests each probing key sends in turn (priority)")
    p.add_argument("--batch", type=int, default=8, help="PREFIXSERVE_MAX_BATCH_SIZE of the priority scenario")
    p.add_argument("--flood-new", type=int, default=16, help="max_new_tokens of each flooding request (priority)")
    return p.parse_args(argv)


class Bench:
    """One app on an embedded Redis (under a temporary directory), reached as `client`, and its store."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        config = LlamaConfig(
            hidden_size=args.hidden,
            intermediate_size=2 * args.hidden,
            num_attention_heads=args.heads,
            num_key_value_heads=args.heads,
            num_hidden_layers=args.layers,
            vocab_size=args.vocab,
            max_position_embeddings=256,
            pad_token_id=0,
        )
        torch.manual_seed(0)
        self.backbone = wrap_model(LlamaForCausalLM(config).eval(), None, name="llama-random")
        self.data_dir = tempfile.mkdtemp(prefix="ps-tenancy-")

    @asynccontextmanager
    async def serving(self, **settings) -> AsyncIterator[httpx.AsyncClient]:
        """The app's lifespan entered (as a server enters it) and an httpx client on it, no socket."""
        s = ServiceSettings(
            data_dir=self.data_dir,
            namespace=f"tenancy-{uuid.uuid4().hex[:8]}",
            max_queue=max(4096, 4 * self.args.requests),
            **settings,
        )
        app = create_app(s, backbone=self.backbone)
        async with app.router.lifespan_context(app):
            self.store = app.state.services.store
            self.scheduler = app.state.services.scheduler
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=120) as client:
                yield client

    async def publish(self, task: str, versions: int) -> None:
        """`versions` random P-Tuning v2 versions of `task` (the last one current)."""
        fp = BackboneFingerprint.from_config(self.backbone.model.config)
        for seed in range(versions):
            g = torch.Generator().manual_seed(seed)
            kv = torch.randn(fp.num_layers, 2, fp.num_kv_heads, self.args.prefix, fp.head_dim, generator=g) * 0.5
            await self.store.put(PrefixArtifact(task=task, method="p_tuning_v2", fingerprint=fp, kv=kv))

    def close(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)


async def send_all(
    client: httpx.AsyncClient, bodies: list[tuple[dict, dict]], concurrency: int
) -> list[httpx.Response]:
    """POSTs /v1/generate for every (body, headers), at most `concurrency` in flight; responses in order."""
    gate = asyncio.Semaphore(concurrency)

    async def one(body: dict, headers: dict) -> httpx.Response:
        async with gate:
            return await client.post("/v1/generate", json=body, headers=headers)

    return list(await asyncio.gather(*(one(b, h) for b, h in bodies)))


# -- scenarios: each takes the bench and the report, prints its figures and records them ----------------------------
async def split(bench: Bench, report: dict) -> None:
    args = bench.args
    async with bench.serving() as client:
        await bench.publish("canary", 2)
        r = await client.put("/v1/tasks/canary/traffic", json={"weights": {"1": 50, "2": 50}})
        assert r.status_code == 200, r.text
        body = {"task": "canary", "input_ids": [5, 6, 7], "max_new_tokens": args.new, "ignore_eos": True}
        ids = [f"bench-{i:06d}" for i in range(args.requests)]  # distinct, and the same in every run
        start = time.perf_counter()
        responses = await send_all(client, [(body, {"x-request-id": rid}) for rid in ids], args.concurrency)
        elapsed = time.perf_counter() - start
        failed = [r for r in responses if r.status_code != 200]
        assert not failed, failed[0].text
        served = [int(r.headers["x-prefix-version"]) for r in responses]
        assert served == [r.json()["version"] for r in responses], "the header and the body agree"
        again = await send_all(client, [(body, {"x-request-id": rid}) for rid in ids[:200]], args.concurrency)
        same = sum(int(r.headers["x-prefix-version"]) == v for r, v in zip(again, served, strict=False))
    counts = collections.Counter(served)
    fractions = {v: counts[v] / len(served) for v in (1, 2)}
    within = all(0.45 <= f <= 0.55 for f in fractions.values())
    report["split"] = {"fractions": fractions, "within_45_55": within, "stable": same / len(again)}
    print(
        f"split 50/50 over {len(served)} unpinned requests with distinct request ids ({elapsed:.1f}s, "
        f"{len(served) / elapsed:.0f} requests/s): v1 {fractions[1]:.1%}, v2 {fractions[2]:.1%} "
        f"({'within' if within else 'OUTSIDE'} 45-55%); the first {len(again)} ids sent again: {same} on the same "
        "version"
    )


ADMIN = "bench-admin"


async def priority(bench: Bench, report: dict) -> None:
    args = bench.args
    admin = {"authorization": f"Bearer {ADMIN}"}
    async with bench.serving(admin_keys=[ADMIN], max_batch_size=args.batch) as client:
        await bench.publish("shared", 1)
        keys = {}
        flooders = [f"flood-{i}" for i in range(args.flood_keys)]
        for name, prio in [*((f, "low") for f in flooders), ("high", "high"), ("control", "low")]:
            r = await client.post(
                "/v1/keys", json={"name": name, "scope": "inference", "priority": prio}, headers=admin
            )
            assert r.status_code == 201, r.text
            keys[name] = {"authorization": f"Bearer {r.json()['key']}"}
        probe = {"task": "shared", "input_ids": [5, 6, 7], "max_new_tokens": args.new, "ignore_eos": True}
        # flood lengths spread over 1..2 x --flood-new, so rows free up one by one as in real traffic (equal lengths
        # would finish a whole batch at once, every --flood-new steps)
        lengths = [1 + (i * 7919) % (2 * args.flood_new) for i in range(args.flood)]

        async def latencies(key: str) -> list[float]:
            out = []
            for _ in range(args.probes):
                start = time.perf_counter()
                r = await client.post("/v1/generate", json=probe, headers=keys[key])
                assert r.status_code == 200, r.text
                out.append(time.perf_counter() - start)
            return out

        idle = {key: await latencies(key) for key in ("high", "control")}
        scheduler = bench.scheduler
        bodies = [({**probe, "max_new_tokens": n}, keys[flooders[i % len(flooders)]]) for i, n in enumerate(lengths)]
        flooding = asyncio.ensure_future(send_all(client, bodies, args.flood))
        while scheduler.queue_depth < args.flood // 2:  # the flood is queued before the probes start
            await asyncio.sleep(0.01)
        loaded = {}
        for key in ("high", "control"):
            depth = scheduler.queue_depth
            loaded[key] = await latencies(key)
            print(f"  {key}: probes sent with {depth} flood requests waiting", flush=True)
        responses = await flooding
        assert all(r.status_code == 200 for r in responses), "every flood request is served in the end"

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    figures = {}
    for key in ("high", "control"):
        ratio = median(loaded[key]) / median(idle[key])
        figures[key] = {"idle_s": median(idle[key]), "loaded_s": median(loaded[key]), "ratio": ratio}
        print(
            f"priority {key:>7} ({'high' if key == 'high' else 'low'}): median latency idle "
            f"{median(idle[key]) * 1e3:.1f} ms, under a saturating low flood {median(loaded[key]) * 1e3:.1f} ms "
            f"({ratio:.2f}x)"
        )
    report["priority"] = figures


SCENARIOS: dict[str, Callable[[Bench, dict], Awaitable[None]]] = {"split": split, "priority": priority}


async def main(args: argparse.Namespace) -> dict:
    bench = Bench(args)
    print(
        f"backbone: llama random, {args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab {args.vocab}; "
        f"torch threads {torch.get_num_threads()}; P = {args.prefix}, {args.new} new tokens per request"
    )
    report: dict = {}
    try:
        for name in args.only:
            print(f"[{name}]", flush=True)
            await SCENARIOS[name](bench, report)
    finally:
        bench.close()
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(parse_args()))
