"""Builds the real serving stack (Redis store -> host cache -> engine -> scheduler) around a tiny model, and
PEFT adapters that travel the real path: save_pretrained -> import -> Redis -> engine."""

from __future__ import annotations

import asyncio
import copy
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch

from prefix_store import BackboneFingerprint, PrefixStore, import_peft_dir
from service.runtime import Engine, HostCache, Scheduler, build_serving, wrap_model


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
