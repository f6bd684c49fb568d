"""Two tiers of the serving path around a tiny model.

The engine tier (`run_engine`, `stored`): `Engine.step(StepPlan(...))` driven directly, as the trainer drives it, with
artifacts that took the store's round trip (version stamped, encoded, decoded) and no Redis: for the tests about
the math. The full stack (`serving_stack`, `publish_peft`): Redis store -> host cache -> engine -> scheduler, and PEFT
adapters that travel the real path (save_pretrained -> import -> Redis -> engine): for the tests about that path."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections.abc import Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch

from prefix_store import BackboneFingerprint, PrefixArtifact, PrefixStore, decode, encode, import_peft_dir
from service.runtime import (
    Engine,
    EngineRequest,
    GenerationResult,
    HostCache,
    RowOutput,
    Scheduler,
    StepPlan,
    build_serving,
    wrap_model,
)
from service.runtime.output import generation_result


# -- the engine tier: no Redis, no scheduler ----------------------------------------------------------------------
def stored(artifact: PrefixArtifact, version: int = 1) -> PrefixArtifact:
    """The artifact as the store hands it back: stamped with a version (the engine caches by (task, version)),
    encoded and decoded by the store's codec."""
    return decode(encode(dataclasses.replace(artifact, version=version)))


def import_peft(pm, task: str, backbone_config, out_dir, labels=None, version: int = 1) -> PrefixArtifact:
    """A PEFT model's adapter the way an upload takes it (save_pretrained -> import), as the store hands it back."""
    pm.save_pretrained(out_dir)
    art = import_peft_dir(out_dir, task=task, backbone=BackboneFingerprint.from_config(backbone_config), labels=labels)
    return stored(art, version)


def engine_for(model, tokenizer=None, name: str = "tiny", **engine_kw) -> Engine:
    """An engine around `model` (served as is: pass a copy to keep the original)."""
    return Engine(wrap_model(model, tokenizer, name=name), **engine_kw)


def run_engine(
    engine: Engine,
    admit: Iterable[EngineRequest] | Mapping[int, Iterable[EngineRequest]],
    cancel: Mapping[int, Iterable[str]] | None = None,
) -> dict[str, list[RowOutput]]:
    """Steps the engine as the scheduler would (each admission's prefixes loaded first, then admitted in one plan)
    until no row runs and nothing is left to admit. `admit`: the requests of the first step, or {step: requests}
    counted from 0 (this call's first step); `cancel`: {step: request ids}. Returns each request's outputs in order,
    by request id; an output that carries an error raises it, as a request handle does."""
    plans = {0: list(admit)} if not isinstance(admit, Mapping) else {k: list(v) for k, v in admit.items()}
    cancel = cancel or {}
    outputs: dict[str, list[RowOutput]] = {}
    step = 0
    while step == 0 or engine.running or any(k >= step for k in (*plans, *cancel)):
        reqs = plans.get(step, [])
        loaded = engine.load(reqs)
        failed = {rid: e for rid, e in loaded.items() if e is not None}
        assert not failed, f"prefix loads failed: {failed}"
        for out in engine.step(StepPlan(tuple(reqs), frozenset(cancel.get(step, ())))).rows:
            if out.error is not None:
                raise out.error
            outputs.setdefault(out.request_id, []).append(out)
        step += 1
    return outputs


def generate(engine: Engine, requests: Iterable[EngineRequest]) -> list[GenerationResult]:
    """Generation requests admitted together, each request's result as the scheduler's handle assembles it."""
    requests = list(requests)
    outs = run_engine(engine, requests)
    return [
        generation_result(
            r.artifact.task if r.artifact else None,
            r.artifact.version if r.artifact else None,
            len(r.prompt_ids),
            outs[r.request_id],
            bool(r.params and r.params.logprobs),
        )
        for r in requests
    ]


# -- the full stack: Redis store -> host cache -> engine -> scheduler -----------------------------------------------


@dataclass
class Stack:
    store: PrefixStore
    cache: HostCache
    engine: Engine
    scheduler: Scheduler


@asynccontextmanager
async def serving_stack(store: PrefixStore, model, tokenizer=None, name="tiny", **scheduler_kw):
    scheduler = build_serving(wrap_model(model, tokenizer, name=name), store, **scheduler_kw)
    cache = scheduler.host_cache
    cache.start()
    await asyncio.wait_for(cache.subscribed.wait(), 10)
    scheduler.start()
    try:
        yield Stack(store, cache, scheduler.engine, scheduler)
    finally:
        await scheduler.stop()
        await cache.stop()


def trained_peft(base, config, seed: int):
    """A PEFT model around a copy of `base` with random (not near-zero) trainable weights, in eval mode."""
    from peft import get_peft_model  # here, so the golden tests run where PEFT does not import

    pm = get_peft_model(copy.deepcopy(base), config)
    torch.manual_seed(seed)
    for p in pm.parameters():
        if p.requires_grad:
            p.data.normal_()
    return pm.eval()


async def publish_peft(store: PrefixStore, pm, task: str, backbone_config, out_dir, labels=None):
    pm.save_pretrained(out_dir)
    art = import_peft_dir(out_dir, task=task, backbone=BackboneFingerprint.from_config(backbone_config), labels=labels)
    return await store.put(art)
