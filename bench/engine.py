"""Mixed-task throughput, measured side by side in one run.

For each number of distinct tasks k, the same workload (N requests, prompt T tokens, G new tokens, prefix P)
runs three ways:
  (a) prefix-serve, requests spread over k tasks (mixed-task batches),
  (b) prefix-serve, every request on one task,
  (c) PEFT: requests grouped by task, each group through PeftModel.generate with its adapter active.
It prints generated tokens/s and the ratios a/b (the cost of mixing, ideally 1) and a/c (the gain over one task
per batch). The backbone is a random-initialised GPT-2 of configurable size: weights do not change speed.

    python bench/engine.py                                      # CPU-sized defaults
    python bench/engine.py --layers 24 --hidden 1024 --heads 16 --device cuda   # GPT-2-medium-sized
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import statistics
import tempfile
import time
import uuid

import torch
from peft import PrefixTuningConfig, get_peft_model
from safetensors.torch import save as st_save
from transformers import GPT2Config, GPT2LMHeadModel

from prefix_store import BackboneFingerprint, PrefixStore, import_peft_adapter, open_store
from service.runtime import SamplingParams, Scheduler, build_serving, wrap_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per request")
    p.add_argument("--new", type=int, default=32, help="new tokens per request")
    p.add_argument("--prefix", type=int, default=16, help="virtual tokens per task")
    p.add_argument("--tasks", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--max-batch", type=int, default=64, help="prefix-serve's max rows per batch")
    p.add_argument("--repeats", type=int, default=3, help="runs of (a) and (b) per task count; medians reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return p.parse_args(argv)


def build_model(args: argparse.Namespace) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=args.layers,
        n_embd=args.hidden,
        n_head=args.heads,
        vocab_size=args.vocab,
        n_positions=max(1024, args.prefix + args.prompt + args.new),
        bos_token_id=0,
        eos_token_id=1,
    )
    dtype = getattr(torch, args.dtype)
    return GPT2LMHeadModel(cfg).to(device=args.device, dtype=dtype).eval()


def add_adapters(peft_model, names: list[str], P: int) -> None:
    for i, name in enumerate(names):
        if name not in peft_model.peft_config:
            peft_model.add_adapter(name, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
        torch.manual_seed(100 + i)
        peft_model.prompt_encoder[name].embedding.weight.data.normal_(0, 0.5)


async def publish(store: PrefixStore, peft_model, names: list[str], fp: BackboneFingerprint) -> None:
    for name in names:
        flat = peft_model.get_prompt_embedding_to_save(name).detach().float().cpu()
        cfg = peft_model.peft_config[name].to_dict()
        cfg["peft_type"], cfg["task_type"] = "PREFIX_TUNING", "CAUSAL_LM"
        art = import_peft_adapter(cfg, st_save({"prompt_embeddings": flat.contiguous()}), task=name, backbone=fp)
        await store.put(art)


async def run_ours(scheduler: Scheduler, tasks: list[str], prompts: list[list[int]], new: int) -> float:
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    # Warm-up: one request per distinct task fills the prefix caches (timing excludes first loads).
    await asyncio.gather(
        *(scheduler.submit(t, prompts[0], SamplingParams(max_new_tokens=1)).result() for t in sorted(set(tasks)))
    )
    start = time.perf_counter()
    results = await asyncio.gather(
        *(scheduler.submit(t, p, params).result() for t, p in zip(tasks, prompts, strict=True))
    )
    elapsed = time.perf_counter() - start
    assert all(r.completion_tokens == new for r in results)
    return sum(r.completion_tokens for r in results) / elapsed


def run_peft(peft_model, tasks: list[str], prompts: list[list[int]], new: int, device: str) -> float:
    groups: dict[str, list[list[int]]] = {}
    for t, p in zip(tasks, prompts, strict=True):
        groups.setdefault(t, []).append(p)
    generated = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for task, rows in groups.items():
            peft_model.set_adapter(task)
            ids = torch.tensor(rows, device=device)
            out = peft_model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
            generated += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return generated / (time.perf_counter() - start)


async def main(args: argparse.Namespace) -> None:
    model = build_model(args)
    fp = BackboneFingerprint.from_config(model.config)
    max_tasks = max(args.tasks)
    names = [f"task-{i}" for i in range(max_tasks)]
    peft_model = get_peft_model(
        model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.prefix), adapter_name=names[0]
    )
    add_adapters(peft_model, names, args.prefix)
    peft_model.eval()

    data_dir = tempfile.mkdtemp(prefix="ps-bench-")
    store, server = open_store(None, data_dir, namespace=f"bench-{uuid.uuid4().hex[:8]}")
    await publish(store, peft_model, names, fp)
    backbone = wrap_model(peft_model.get_base_model(), None, name="gpt2-random")
    scheduler = build_serving(
        backbone,
        store,
        max_batch_size=args.max_batch,
        max_queue=args.requests * 2,
        max_batch_tokens=args.max_batch * (args.prefix + args.prompt + args.new),
    )
    cache = scheduler.host_cache
    cache.start()
    scheduler.start()

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, args.vocab, (args.requests, args.prompt), generator=g).tolist()
    print(
        f"backbone: GPT-2 random, {args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab "
        f"{args.vocab}, {args.dtype} on {args.device}; torch threads {torch.get_num_threads()}"
    )
    print(
        f"workload: {args.requests} requests x (prompt {args.prompt} + {args.new} new tokens), prefix "
        f"{args.prefix} virtual tokens; prefix-serve max batch {args.max_batch}\n"
    )
    print(f"{'tasks':>6} {'(a) mixed tok/s':>16} {'(b) same tok/s':>15} {'(c) PEFT tok/s':>15} {'a/b':>6} {'a/c':>7}")
    try:
        warm = [names[i % len(names)] for i in range(args.requests)]
        await run_ours(scheduler, warm, prompts, args.new)  # warm-up: threads, allocator, caches
        ours = {}
        for k in args.tasks:
            mixed = [names[i % k] for i in range(args.requests)]
            same = [names[0]] * args.requests
            # Interleaved repeats, median of each: a and b see the same machine conditions.
            runs = [
                (
                    await run_ours(scheduler, mixed, prompts, args.new),
                    await run_ours(scheduler, same, prompts, args.new),
                )
                for _ in range(args.repeats)
            ]
            ours[k] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        # PEFT runs after all of ours: its large one-task batches leave the allocator in a state that slowed
        # whatever ran next in the same process by up to a third (seen on CPU), which would skew a and b.
        for k in args.tasks:
            a, b = ours[k]
            c = run_peft(peft_model, [names[i % k] for i in range(args.requests)], prompts, args.new, args.device)
            print(f"{k:>6} {a:>16.1f} {b:>15.1f} {c:>15.1f} {a / b:>6.2f} {a / c:>7.1f}", flush=True)
    finally:
        await scheduler.stop()
        await cache.stop()
        await store.aclose()
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(parse_args()))
