"""The engine at scale, measured side by side in one run: tasks hosted, prefix length, cache churn, PEFT, the bare
backbone, key/value memory, FLOP/s, the decode stall of chunked prefill, and the LoRA tax.

Every figure comes from the real serving stack (embedded Redis -> host cache -> device pool -> engine -> scheduler)
in this process, with a random-initialised backbone (weights do not change speed) and tasks published as P-Tuning v2
artifacts. Throughput is generated tokens per second over a burst of requests, median of `--repeats` interleaved
runs, every prefix resident unless the scenario says otherwise.

  hosted    throughput with 1 .. 10,000 tasks hosted (requests spread over as many of them as there are requests),
            as a ratio to 1 task
  prefix    throughput at P = 16 .. 256, 64 tasks
  churn     1,000 tasks vs 5 with the host cache sized for 16 prefixes and the device pool for the running rows'
            prefixes plus 16 (most requests reload from Redis)
  bare      every request on the bare backbone (no prefix) through the same engine, vs 64 tasks
  bias      64 bias (bitfit) tasks mixed with 64 prefix tasks, half the requests each, vs the 64 prefix tasks alone
            (on a GPT-2 of the same size when --arch has no biases)
  peft      ours vs PEFT running each task's requests as one batch (`--peft-tasks`), and the achieved FLOP/s of our
            run as a fraction of this machine's fp32 matrix-multiply peak (a 2048^3 GEMM measured in the same run)
  sampling  every row sampled plainly vs a quarter each with penalties, top logprobs, a JSON schema, plain
  memory    key/value bytes the engine holds (pool + slot buffers) vs the ideal (unique prefixes + tokens), sampled
            at every step, at 1 task with P = 128 and at 64 tasks with P = 16
  stall     decode stall p99 (time between two tokens of the decoding rows) while long prompts arrive, with chunked
            prefill (chunks of `--chunk`) and without
  loads     microseconds per prefix load from each tier: the Redis read, decoding (checksum and checks), placing
            key/values in the device pool, and the forward that turns a soft prompt into key/values
  roofline  one decode step of 64 rows over 4 tasks, driven on the engine directly: bytes it must read (weights +
            the key/values it attends to) / its time, against the device's memory bandwidth (a GPU's from HBM_GBPS
            or --hbm-gbps; on a CPU a large copy measured in the same run)
  first     the first request after a fresh start (its task read from Redis, the engine's buffers not yet grown)
            vs the same request once warm: its latency ratio (eager; the step is not compiled)
  cascade   decode's prefix attention grouped by task (each prefix read once per layer) vs per row, 64 rows over
            4 tasks and over 64 tasks, at P = --prefix-lengths: throughput ratio, and the key/value bytes a decode
            step reads / the ideal (unique prefixes + the rows' tokens) for each path
  compile   the decode step compiled (PREFIXSERVE_COMPILE=on, runtime/compiled.py) vs eager, on the engine directly:
            compile time of each graph (batch buckets of --compile-batches at P = --prefix, a fresh inductor cache,
            so nothing is reused from an earlier run), the first request of a fresh engine whose graphs are warm vs
            the same request warm, and the median decode step time compiled vs eager at each of --compile-batches
            rows (4 tasks), the two interleaved
  lora      the LoRA tax: 64 LoRA tasks of rank --lora-rank on q/v (GPT-2: its fused c_attn, as PEFT targets it)
            vs the bare backbone through the same engine, 1 - LoRA / bare; and 32 LoRA + 32 prefix tasks mixed, half
            the rows each, vs 64 prefix tasks alone

    python bench/engine.py                       # everything, CPU-sized defaults (about 10 minutes on 2 cores)
    python bench/engine.py --only hosted churn   # some scenarios
    python bench/engine.py --layers 24 --hidden 1024 --heads 16 --device cuda --dtype bfloat16   # GPT-2 medium
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import shutil
import statistics
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from prefix_store import BackboneFingerprint, PrefixArtifact, open_store
from prefix_store.artifact import LowRank
from service.runtime import SamplingParams, Scheduler, build_serving, wrap_model

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = [
    "hosted",
    "prefix",
    "churn",
    "bare",
    "bias",
    "sampling",
    "peft",
    "memory",
    "stall",
    "loads",
    "cascade",
    "roofline",
    "first",
    "compile",
    "lora",
]
# Shapes of real models (random weights): --preset sets the architecture flags. llama-1b is Llama 3.2 1B's geometry.
PRESETS = {
    "gpt2-medium": dict(arch="gpt2", layers=24, hidden=1024, heads=16, vocab=50257),
    "llama-1b": dict(arch="llama", layers=16, hidden=2048, heads=32, kv_heads=8, vocab=128256, intermediate=8192),
}
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# Memory bandwidth of cards, GB/s (vendors' figures), for the roofline of a decode step on a GPU.
HBM_GBPS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H200": 4800, "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=SCENARIOS, default=SCENARIOS)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a real model's shapes (random weights)")
    p.add_argument("--hbm-gbps", type=float, default=None, help="the GPU's memory bandwidth (default: by card name)")
    p.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="llama: key/value heads (default heads // 4)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--new", type=int, default=16, help="new tokens per request")
    p.add_argument("--prefix", type=int, default=16, help="virtual tokens per task")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=6, help="interleaved runs of each workload; medians reported")
    p.add_argument("--hosted", type=int, nargs="+", default=[1, 10, 64, 100, 1000, 10000])
    p.add_argument("--prefix-lengths", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--churn-tasks", type=int, default=1000)
    p.add_argument("--peft-tasks", type=int, default=64)
    p.add_argument("--peft-prompt", type=int, default=64)
    p.add_argument("--peft-new", type=int, default=32)
    p.add_argument(
        "--peft-max-batch", type=int, default=256, help="our max batch in the PEFT/FLOP/s run (PEFT batches per task)"
    )
    p.add_argument("--compile-batches", type=int, nargs="+", default=[1, 8, 64], help="compile scenario's rows")
    p.add_argument("--lora-rank", type=int, default=16, help="rank of the LoRA tasks of the lora scenario")
    p.add_argument("--chunk", type=int, default=128, help="max prefill tokens per step in the stall scenario")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--plots", default=str(ROOT / "bench" / "plots"))
    p.add_argument("--intermediate", type=int, default=None, help="llama: MLP width (default 2 x hidden)")
    args = p.parse_args(argv)
    if args.preset is not None:  # the preset's shapes become the defaults: flags given explicitly still win
        p.set_defaults(**PRESETS[args.preset])
        args = p.parse_args(argv)
    return args


# -- the model and the tasks -------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    positions = max(1024, args.prefix + args.prompt + args.new, max(args.prefix_lengths) + args.prompt + args.new)
    if args.arch == "gpt2":
        cfg = GPT2Config(
            n_layer=args.layers,
            n_embd=args.hidden,
            n_head=args.heads,
            vocab_size=args.vocab,
            n_positions=positions,
            bos_token_id=0,
            eos_token_id=1,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(
            hidden_size=args.hidden,
            intermediate_size=args.intermediate or 2 * args.hidden,
            tie_word_embeddings=True,  # as Llama 3.2 1B: the LM head is the input embedding
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads or max(1, args.heads // 4),
            num_hidden_layers=args.layers,
            vocab_size=args.vocab,
            max_position_embeddings=positions,
            bos_token_id=0,
            eos_token_id=1,
        )
        model = LlamaForCausalLM(cfg)
    return model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()


def random_artifact(name: str, fp: BackboneFingerprint, P: int, seed: int) -> PrefixArtifact:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(fp.num_layers, 2, fp.num_kv_heads, P, fp.head_dim, generator=g) * 0.5
    return PrefixArtifact(task=name, method="p_tuning_v2", fingerprint=fp, kv=kv)


def random_bias_artifact(name: str, backbone, seed: int) -> PrefixArtifact:
    """A bitfit task shifting every bias of the backbone."""
    g = torch.Generator().manual_seed(seed)
    deltas = {path: 0.1 * torch.randn(size, generator=g) for path, size in backbone.bias_sizes.items()}
    return PrefixArtifact(task=name, method="bitfit", fingerprint=backbone.fingerprint, biases=deltas)


def lora_targets(backbone) -> list[str]:
    """The projections the lora scenario's tasks adapt: q and v (Llama), or GPT-2's fused c_attn (q, k and v in one
    Conv1D: PEFT's default target there, since q and v cannot be adapted apart)."""
    paths = [p for p in backbone.linear_sizes if p.endswith(("q_proj", "v_proj"))]
    return paths or [p for p in backbone.linear_sizes if p.endswith("c_attn")]


def random_lora_artifact(name: str, backbone, rank: int, seed: int) -> PrefixArtifact:
    """A LoRA task of rank `rank` on lora_targets, scale alpha / r = 2 (alpha = 2r), B nonzero (as once trained)."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for path in lora_targets(backbone):
        n_in, n_out = backbone.linear_sizes[path]
        a = torch.randn(rank, n_in, generator=g) / n_in**0.5
        factors[path] = LowRank(a, 0.01 * torch.randn(n_out, rank, generator=g), 2.0)
    return PrefixArtifact(task=name, method="lora", fingerprint=backbone.fingerprint, low_rank=factors)


def prefix_bytes(fp: BackboneFingerprint, P: int, dtype: torch.dtype) -> int:
    return 2 * fp.num_layers * fp.num_kv_heads * fp.head_dim * P * torch.empty((), dtype=dtype).element_size()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model = build_model(args)
        self.backbone = wrap_model(self.model, None, name=f"{args.arch}-random")
        self.fp = self.backbone.fingerprint
        self.data_dir = tempfile.mkdtemp(prefix="ps-bench-")
        self.store, self.server = open_store(None, self.data_dir, namespace=f"bench-{uuid.uuid4().hex[:8]}")
        self.published: dict[int, list[str]] = {}  # P -> task names published with that prefix length
        self.last_runs: list[list[float]] = []
        g = torch.Generator().manual_seed(0)
        self.prompts = torch.randint(2, args.vocab, (args.requests, max(args.prompt, args.peft_prompt)), generator=g)

    async def bias_tasks(self, n: int) -> list[str]:
        names = self.published.setdefault(-1, [])
        while len(names) < n:
            name = f"bias-t{len(names)}"
            await self.store.put(random_bias_artifact(name, self.backbone, seed=len(names)))
            names.append(name)
        return names[:n]

    async def lora_tasks(self, n: int) -> list[str]:
        names = self.published.setdefault(-2, [])
        while len(names) < n:
            name = f"lora-t{len(names)}"
            await self.store.put(random_lora_artifact(name, self.backbone, self.args.lora_rank, seed=len(names)))
            names.append(name)
        return names[:n]

    async def tasks(self, n: int, P: int) -> list[str]:
        names = self.published.setdefault(P, [])
        while len(names) < n:
            name = f"p{P}-t{len(names)}"
            await self.store.put(random_artifact(name, self.fp, P, seed=len(names)))
            names.append(name)
        return names[:n]

    @asynccontextmanager
    async def stack(self, **kw):
        a = self.args
        settings = dict(
            max_batch_size=a.max_batch,
            max_queue=max(4 * a.requests, 20000),
            max_batch_tokens=a.max_batch * 2048,
            device_cache_bytes=4 * 1024**3,
            host_cache_bytes=8 * 1024**3,
        )
        scheduler = build_serving(self.backbone, self.store, **(settings | kw))
        scheduler.host_cache.start()
        await asyncio.wait_for(scheduler.host_cache.subscribed.wait(), 10)
        scheduler.start()
        try:
            yield scheduler
        finally:
            await scheduler.stop()
            await scheduler.host_cache.stop()

    async def close(self) -> None:
        await self.store.aclose()
        self.server.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


async def burst(scheduler: Scheduler, tasks: list[str | None], prompts: torch.Tensor, prompt: int, new: int) -> float:
    """Submits one request per task entry at once; generated tokens per second until the last finishes."""
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    start = time.perf_counter()
    results = await asyncio.gather(
        *(
            scheduler.submit(t, prompts[i % len(prompts), :prompt].tolist(), params).result()
            for i, t in enumerate(tasks)
        )
    )
    elapsed = time.perf_counter() - start
    assert all(r.completion_tokens == new for r in results)
    return sum(r.completion_tokens for r in results) / elapsed


async def warm(scheduler: Scheduler, tasks: list[str | None], prompts: torch.Tensor) -> None:
    """One short request per distinct task, in waves, so every prefix is loaded before timing."""
    distinct = list(dict.fromkeys(tasks))
    for start in range(0, len(distinct), 512):
        await asyncio.gather(
            *(
                scheduler.submit(t, prompts[0, :4].tolist(), SamplingParams(max_new_tokens=1)).result()
                for t in distinct[start : start + 512]
            )
        )


def spread(names: list[str], n: int) -> list[str | None]:
    """n requests over the hosted tasks: request i goes to task i * len(names) // n (every task when n >= len)."""
    return [names[(i * len(names)) // n if len(names) > n else i % len(names)] for i in range(n)]


async def median_ratio(
    runs: list[tuple[Scheduler, list[str | None]]], b: Bench, prompt: int, new: int, repeats: int
) -> list[float]:
    """Several workloads run in turn, `repeats` times, the order reversed every other time (ABBA), so slow spells of
    the machine fall on each alike. Returns the median tok/s of each; compare them with `pair_ratio`."""
    results: list[list[float]] = [[] for _ in runs]
    for r in range(repeats):
        order = list(range(len(runs))) if r % 2 == 0 else list(reversed(range(len(runs))))
        for i in order:
            sched, tasks = runs[i]
            results[i].append(await burst(sched, tasks, b.prompts, prompt, new))
    b.last_runs = results
    return [statistics.median(r) for r in results]


def pair_ratio(b: Bench, i: int = 1, j: int = 0) -> float:
    """The median over repeats of run i's throughput / run j's, each pair measured back to back."""
    runs = b.last_runs
    return statistics.median(x / y for x, y in zip(runs[i], runs[j], strict=True))


# -- scenarios ---------------------------------------------------------------------------------------------------
async def hosted(b: Bench, report: dict) -> None:
    a = b.args
    one = spread(await b.tasks(1, a.prefix), a.requests)
    rows = []
    async with b.stack() as sched:
        await warm(sched, one, b.prompts)
        for k in a.hosted:
            names = await b.tasks(k, a.prefix)
            await warm(sched, names, b.prompts)
            many = spread(names, a.requests)
            _, tok_k = await median_ratio([(sched, one), (sched, many)], b, a.prompt, a.new, a.repeats)
            ratio = pair_ratio(b)
            rows.append((k, tok_k, ratio))
            print(f"  hosted {k:>6} tasks: {tok_k:8.1f} tok/s, {ratio:.3f} of 1 task", flush=True)
        pairs = {}
        for many_k, few_k in ((64, 1), (1000, 5)):
            if many_k not in a.hosted:
                continue
            few, many = (
                spread(await b.tasks(few_k, a.prefix), a.requests),
                spread(await b.tasks(many_k, a.prefix), a.requests),
            )
            await median_ratio([(sched, few), (sched, many)], b, a.prompt, a.new, 2 * a.repeats)
            pairs[(many_k, few_k)] = pair_ratio(b)
            print(f"  {many_k} tasks vs {few_k}: {pairs[(many_k, few_k)]:.3f}", flush=True)
    report["hosted"] = rows
    report["pairs"] = pairs


async def prefix_lengths(b: Bench, report: dict) -> None:
    a = b.args
    rows = []
    async with b.stack() as sched:
        for P in a.prefix_lengths:
            tasks = spread(await b.tasks(64, P), a.requests)
            await warm(sched, tasks, b.prompts)
            (tok,) = await median_ratio([(sched, tasks)], b, a.prompt, a.new, a.repeats)
            rows.append((P, tok))
            print(f"  P = {P:>4}: {tok:8.1f} tok/s", flush=True)
    report["prefix"] = rows


async def churn(b: Bench, report: dict) -> None:
    a = b.args
    one_prefix = prefix_bytes(b.fp, a.prefix, b.backbone.dtype)
    small = dict(device_cache_bytes=(a.max_batch + 16) * one_prefix, host_cache_bytes=16 * one_prefix)
    few = spread(await b.tasks(5, a.prefix), a.requests)
    many = spread(await b.tasks(a.churn_tasks, a.prefix), a.requests)
    async with b.stack(**small) as s_few, b.stack(**small) as s_many:
        await warm(s_few, few, b.prompts)
        await burst(s_many, many, b.prompts, a.prompt, a.new)  # warm the code paths; the caches cannot hold 1,000
        host = s_many.host_cache.lru.stats.copy()
        tok_few, tok_many = await median_ratio([(s_few, few), (s_many, many)], b, a.prompt, a.new, a.repeats)
        ratio = pair_ratio(b)
        host_after = s_many.host_cache.lru.stats
        misses = host_after["misses"] - host["misses"]
        lookups = misses + host_after["hits"] - host["hits"]
    report["churn"] = (tok_few, tok_many, ratio, misses / max(1, lookups))
    print(
        f"  churn: 5 tasks {tok_few:.1f} tok/s, {a.churn_tasks} tasks {tok_many:.1f} tok/s "
        f"({ratio:.3f}); host-cache miss rate {misses / max(1, lookups):.0%}",
        flush=True,
    )


async def bare(b: Bench, report: dict) -> None:
    a = b.args
    tasks = spread(await b.tasks(64, a.prefix), a.requests)
    base: list[str | None] = [None] * a.requests
    async with b.stack() as sched:
        await warm(sched, tasks, b.prompts)
        tok_tasks, tok_base = await median_ratio([(sched, tasks), (sched, base)], b, a.prompt, a.new, a.repeats)
    ratio = pair_ratio(b, 0, 1)
    report["bare"] = (tok_tasks, tok_base, ratio)
    print(f"  64 tasks {tok_tasks:.1f} tok/s, bare backbone {tok_base:.1f} tok/s ({ratio:.3f})")


async def bias(b: Bench, report: dict) -> None:
    a = b.args
    own = b if b.backbone.bias_sizes else Bench(argparse.Namespace(**{**vars(a), "arch": "gpt2"}))
    try:
        prefix_tasks = spread(await own.tasks(64, a.prefix), a.requests)
        bias_tasks = spread(await own.bias_tasks(64), a.requests)
        mixed = [prefix_tasks[i] if i % 2 == 0 else bias_tasks[i] for i in range(a.requests)]
        bare_rows: list[str | None] = [None] * a.requests
        async with own.stack() as sched:
            await warm(sched, prefix_tasks + bias_tasks, own.prompts)
            runs = [(sched, prefix_tasks), (sched, mixed), (sched, bare_rows), (sched, bias_tasks)]
            tok_alone, tok_mixed, tok_bare, tok_bias = await median_ratio(runs, own, a.prompt, a.new, a.repeats)
        ratio, hooks = pair_ratio(own, 1, 0), pair_ratio(own, 3, 2)
    finally:
        if own is not b:
            await own.close()
    report["bias"] = (tok_alone, tok_mixed, ratio, tok_bare, tok_bias, hooks)
    print(f"  64 prefix tasks {tok_alone:.1f} tok/s, + 64 bias tasks mixed in {tok_mixed:.1f} tok/s ({ratio:.3f})")
    print(f"  bare backbone {tok_bare:.1f} tok/s, 64 bias tasks only {tok_bias:.1f} tok/s ({hooks:.3f})")


async def lora(b: Bench, report: dict) -> None:
    """The LoRA tax (64 LoRA tasks vs the bare backbone) and LoRA rows mixed with prefix rows vs prefix rows alone,
    the four workloads interleaved on one warm stack (every task resident)."""
    a = b.args
    prefix_tasks = spread(await b.tasks(64, a.prefix), a.requests)
    lora_tasks = spread(await b.lora_tasks(64), a.requests)
    half_prefix, half_lora = await b.tasks(32, a.prefix), await b.lora_tasks(32)
    # Request i alternates prefix and LoRA tasks: any 64 consecutive requests (a batch) hold 32 of each, one row each.
    mixed = [(half_prefix if i % 2 == 0 else half_lora)[(i // 2) % 32] for i in range(a.requests)]
    bare_rows: list[str | None] = [None] * a.requests
    async with b.stack() as sched:
        await warm(sched, prefix_tasks + lora_tasks + mixed, b.prompts)
        runs = [(sched, bare_rows), (sched, lora_tasks), (sched, prefix_tasks), (sched, mixed)]
        tok_bare, tok_lora, tok_prefix, tok_mixed = await median_ratio(runs, b, a.prompt, a.new, a.repeats)
    tax, mixed_ratio = 1 - pair_ratio(b, 1, 0), pair_ratio(b, 3, 2)
    # Best of the repeats too: on a shared machine a slow spell only ever lowers a run's throughput.
    best = [max(r) for r in b.last_runs]
    tax_best, mixed_best = 1 - best[1] / best[0], best[3] / best[2]
    peak = gemm_peak(a.device, getattr(torch, a.dtype))
    report["lora"] = (tok_bare, tok_lora, tax, tok_prefix, tok_mixed, mixed_ratio, tax_best, mixed_best, peak)
    where = "/".join(sorted({p.rsplit(".", 1)[-1] for p in lora_targets(b.backbone)}))
    print(
        f"  bare backbone {tok_bare:.1f} tok/s, 64 LoRA tasks (rank {a.lora_rank} on {where}) {tok_lora:.1f} tok/s: "
        f"LoRA tax {tax:.1%} (best of {a.repeats}: {tax_best:.1%})",
        flush=True,
    )
    print(
        f"  64 prefix tasks {tok_prefix:.1f} tok/s, 32 LoRA + 32 prefix tasks {tok_mixed:.1f} tok/s "
        f"({mixed_ratio:.3f}; best of {a.repeats}: {mixed_best:.3f}); {SHORT_DTYPE[a.dtype]} GEMM peak "
        f"{peak / 1e9:.1f} GFLOP/s",
        flush=True,
    )


SAMPLING_SCHEMA = {  # never complete within --new tokens, so every row generates the same number of tokens
    "type": "array",
    "items": {"type": "string", "maxLength": 8},
    "minItems": 1000,
}


async def sampling_features(b: Bench, report: dict) -> None:
    """Every row sampled plainly (temperature 1) vs a mix in the same batch: a quarter with presence, frequency and
    repetition penalties, a quarter with logprobs and 5 top alternatives, a quarter constrained by a JSON schema
    (a byte-level BPE tokenizer of the model's vocabulary, trained on the shared datasets, gives the grammar its
    tokens), a quarter plain."""
    import sys

    from service.runtime.grammar import Grammars

    sys.path.insert(0, str(ROOT))  # run as a script, bench/ itself is on the path, not the package
    from bench.grammar_backends import bpe_tokenizer

    a = b.args
    tasks = spread(await b.tasks(64, a.prefix), a.requests)
    plain = SamplingParams(max_new_tokens=a.new, ignore_eos=True, temperature=1.0, seed=0)
    async with b.stack() as sched:
        constrained = plain
        if a.vocab >= 512:  # a byte-level tokenizer needs 257 tokens at least
            sched.engine.grammars = Grammars(bpe_tokenizer(a.vocab), b.backbone.fingerprint.vocab_size)
            spec = {"type": "json_schema", "json_schema": {"schema": SAMPLING_SCHEMA}}
            constrained = replace(plain, grammar=sched.engine.grammars.compile(spec))
        else:
            print(f"  vocab {a.vocab} < 512: no byte-level tokenizer fits, the JSON-schema quarter runs plain")
        mixed = [
            plain,
            replace(plain, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2),
            replace(plain, logprobs=True, top_logprobs=5),
            constrained,
        ]
        await warm(sched, tasks, b.prompts)

        async def run(params: list[SamplingParams]) -> float:
            start = time.perf_counter()
            results = await asyncio.gather(
                *(
                    sched.submit(t, b.prompts[i, : a.prompt].tolist(), params[i % len(params)]).result()
                    for i, t in enumerate(tasks)
                )
            )
            assert all(r.completion_tokens == a.new for r in results)
            return sum(r.completion_tokens for r in results) / (time.perf_counter() - start)

        runs: list[list[float]] = [[], []]
        for r in range(a.repeats):  # ABBA, as median_ratio
            for i in (0, 1) if r % 2 == 0 else (1, 0):
                runs[i].append(await run([plain] if i == 0 else mixed))
    b.last_runs = runs
    tok_plain, tok_mixed = (statistics.median(x) for x in runs)
    ratio = pair_ratio(b, 1, 0)
    report["sampling"] = (tok_plain, tok_mixed, ratio)
    print(f"  all rows plain {tok_plain:.1f} tok/s, mixed features {tok_mixed:.1f} tok/s ({ratio:.3f})")


def best_time(fn, device: str, repeats: int = 5) -> float:
    """The shortest of `repeats` timings of fn() in seconds (a GPU synchronised around each)."""
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_peak(device: str, dtype: torch.dtype) -> float:
    """FLOP/s of a 2048^3 matrix multiply on this machine, best of 5."""
    x = torch.randn(2048, 2048, device=device, dtype=dtype)
    y = torch.randn(2048, 2048, device=device, dtype=dtype)
    best = best_time(lambda: x @ y, device)
    return 2 * 2048**3 / best


def flops_per_request(b: Bench, prompt: int, new: int, P: int) -> float:
    """Matrix-multiply FLOPs of one request: every linear layer on every processed token, the LM head on every
    sampled position, and attention scores and values over prefix + context."""
    linear = sum(
        m.weight.numel()
        for name, m in b.backbone.body.named_modules()
        if hasattr(m, "weight")
        and m.weight is not None
        and m.weight.ndim == 2
        and "wte" not in name
        and "wpe" not in name
        and "embed" not in name
    )
    head = b.fp.hidden_size * b.fp.vocab_size
    H, D, L = b.fp.num_attention_heads, b.fp.head_dim, b.fp.num_layers
    tokens = prompt + new - 1  # the last sampled token is never fed back
    attn = sum(4 * H * D * (P + t + 1) for t in range(tokens)) * L
    return 2 * linear * tokens + 2 * head * new + attn


async def peft(b: Bench, report: dict) -> None:
    from peft import PrefixTuningConfig, get_peft_model

    a = b.args
    names = await b.tasks(a.peft_tasks, a.prefix)
    tasks = spread(names, a.requests)
    async with b.stack(max_batch_size=a.peft_max_batch, max_batch_tokens=a.peft_max_batch * 2048) as sched:
        await warm(sched, tasks, b.prompts)
        (ours,) = await median_ratio([(sched, tasks)], b, a.peft_prompt, a.peft_new, a.repeats)
    peak = gemm_peak(a.device, getattr(torch, a.dtype))
    achieved = ours / a.peft_new * flops_per_request(b, a.peft_prompt, a.peft_new, a.prefix)
    pm = get_peft_model(b.model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=a.prefix), names[0])
    for i, name in enumerate(names):
        if name not in pm.peft_config:
            pm.add_adapter(name, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=a.prefix))
        art = random_artifact(name, b.fp, a.prefix, seed=i)
        pm.prompt_encoder[name].embedding.weight.data = art.kv.permute(3, 0, 1, 2, 4).reshape(a.prefix, -1)
    pm.eval()
    groups: dict[str, list[list[int]]] = {}
    for i, t in enumerate(tasks):
        groups.setdefault(t, []).append(b.prompts[i, : a.peft_prompt].tolist())  # type: ignore[arg-type]
    start, generated = time.perf_counter(), 0
    with torch.inference_mode():
        for task, rows in groups.items():
            pm.set_adapter(task)
            ids = torch.tensor(rows, device=a.device)
            out = pm.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=a.peft_new,
                min_new_tokens=a.peft_new,
                do_sample=False,
                pad_token_id=0,
            )
            generated += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    theirs = generated / (time.perf_counter() - start)
    report["peft"] = (ours, theirs, achieved, peak)
    print(
        f"  {a.peft_tasks} tasks, {a.peft_prompt}+{a.peft_new}, our max batch {a.peft_max_batch}: ours {ours:.1f} "
        f"tok/s, PEFT {theirs:.1f} tok/s "
        f"({ours / theirs:.1f}x); {achieved / 1e9:.1f} GFLOP/s of a {peak / 1e9:.1f} GFLOP/s GEMM peak "
        f"({achieved / peak:.0%})",
        flush=True,
    )


async def memory(b: Bench, report: dict) -> None:
    a = b.args
    rows = []
    for label, n_tasks, P in (("1 task, P = 128", 1, 128), ("64 tasks, P = 16", 64, 16)):
        tasks = spread(await b.tasks(n_tasks, P), a.requests)
        async with b.stack() as sched:
            await warm(sched, tasks, b.prompts)
            samples: list[tuple[int, int]] = []
            engine = sched.engine

            def sample(_rows: int, engine=engine, samples=samples) -> None:
                batch = engine.batch
                if batch is None or not batch.rows:
                    return
                token = engine.pool.token_bytes
                ideal_tokens = sum(int(batch.lengths[r.slot]) for r in batch.rows) * token
                unique = {r.prefix.key: r.kv_len for r in batch.rows if r.prefix is not None}
                ideal = ideal_tokens + sum(unique.values()) * token
                held = engine.cache.nbytes + engine.pool.used_bytes
                samples.append((held, ideal))

            sched.on_step = sample
            await burst(sched, tasks, b.prompts, a.prompt, a.new)
        held, ideal = max(samples, key=lambda s: s[1])  # at the peak of the ideal
        mean_ratio = statistics.mean(h / i for h, i in samples if i)
        rows.append((label, held, ideal, held / ideal, mean_ratio))
        print(
            f"  {label}: held {held / 2**20:.2f} MiB vs ideal {ideal / 2**20:.2f} MiB at the peak "
            f"({held / ideal:.2f}x; mean over steps {mean_ratio:.2f}x)",
            flush=True,
        )
    report["memory"] = rows


def _gap_watcher(gaps: list[float]):
    async def watch(handle) -> None:
        last = None
        async for _ in handle.events():
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now

    return watch


async def stall(b: Bench, report: dict) -> None:
    a = b.args
    short_tasks = spread(await b.tasks(32, a.prefix), 32)
    long_prompt = min(900, b.backbone.max_positions - a.prefix - 8)
    long_ids = torch.randint(2, a.vocab, (4, long_prompt), generator=torch.Generator().manual_seed(1))
    rows = []
    for label, chunk in (("chunked", a.chunk), ("unchunked", 1 << 20)):
        async with b.stack(max_prefill_tokens=chunk, max_batch_tokens=a.max_batch * 4096) as sched:
            await warm(sched, short_tasks, b.prompts)
            params = SamplingParams(max_new_tokens=160, ignore_eos=True)
            handles = [
                sched.submit(t, b.prompts[i % len(b.prompts), :16].tolist(), params) for i, t in enumerate(short_tasks)
            ]
            gaps: list[float] = []
            watch = _gap_watcher(gaps)

            watchers = [asyncio.create_task(watch(h)) for h in handles]
            await asyncio.sleep(0.3)
            longs = []
            for i in range(4):
                longs.append(sched.submit(short_tasks[i], long_ids[i].tolist(), SamplingParams(max_new_tokens=2)))
                await asyncio.sleep(0.25)
            await asyncio.gather(*watchers, *(h.result() for h in longs))
        p99 = statistics.quantiles(gaps, n=100)[98]
        rows.append((label, chunk, statistics.median(gaps), p99, max(gaps)))
        print(
            f"  {label} (max prefill {chunk if chunk < 1 << 20 else 'unbounded'}): inter-token p50 "
            f"{statistics.median(gaps) * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, max {max(gaps) * 1e3:.1f} ms",
            flush=True,
        )
    report["stall"] = rows


async def loads(b: Bench, report: dict) -> None:
    from prefix_store import decode

    a = b.args
    names = await b.tasks(64, a.prefix)
    soft_names = []
    for i in range(64):
        art = PrefixArtifact(
            task=f"soft-{i}",
            method="prompt_tuning",
            fingerprint=b.fp,
            soft_prompt=torch.randn(a.prefix, b.fp.hidden_size, generator=torch.Generator().manual_seed(i)),
        )
        soft_names.append((await b.store.put(art)).task)
    client, keys = b.store.client, b.store.keys
    t0 = time.perf_counter()
    blobs = [await client.hget(keys.version(n, 1), "blob") for n in names]
    redis_us = (time.perf_counter() - t0) / len(names) * 1e6
    t0 = time.perf_counter()
    arts = [decode(blob) for blob in blobs]
    decode_us = (time.perf_counter() - t0) / len(arts) * 1e6
    soft_arts = [await b.store.get(n) for n in soft_names]
    async with b.stack() as sched:
        engine = sched.engine
        from service.runtime import EngineRequest

        def place(artifacts: list[PrefixArtifact]) -> float:
            reqs = [EngineRequest.classify(f"load-{i}", [1], art) for i, art in enumerate(artifacts)]
            t0 = time.perf_counter()
            engine.load(reqs)
            return (time.perf_counter() - t0) / len(reqs) * 1e6

        kv_us = place(arts)
        soft_us = place(soft_arts)
    rows = [
        ("Redis read (HGET of the blob)", redis_us),
        ("decode: checksum, dtypes, shapes, finiteness", decode_us),
        ("device: place key/values in the pool", kv_us),
        ("device: soft prompt -> key/values (a forward)", soft_us),
    ]
    report["loads"] = rows
    size = len(blobs[0])
    for label, us in rows:
        print(f"  {label:<48} {us:9.0f} us  (P = {a.prefix}, {size / 1024:.0f} KiB artifacts)", flush=True)


async def cascade(b: Bench, report: dict) -> None:
    """Grouped (attention.CASCADE = True) vs per-row (False) decode, each run alternately on one warm stack."""
    from service.runtime import attention

    a = b.args
    rows = []
    n = min(a.requests, 64, a.max_batch)  # rows decoding in one step
    per_token = 2 * b.fp.num_layers * b.fp.num_kv_heads * b.fp.head_dim  # key/value elements per token
    saved = attention.CASCADE
    try:
        async with b.stack() as sched:
            for P in a.prefix_lengths:
                for k in (4, 64):
                    tasks = spread(await b.tasks(k, P), n)
                    await warm(sched, tasks, b.prompts)
                    tok: dict[bool, list[float]] = {True: [], False: []}
                    for r in range(a.repeats):
                        for mode in (True, False) if r % 2 == 0 else (False, True):
                            attention.CASCADE = mode
                            tok[mode].append(await burst(sched, tasks, b.prompts, a.prompt, a.new))
                    ratio = statistics.median(g / p for g, p in zip(tok[True], tok[False], strict=True))
                    # Modelled, not measured: the bytes the attention must read in one decode step midway through the
                    # outputs, all n rows decoding together (max batch >= n); every row reads its own tokens either way.
                    tokens = n * (a.prompt + a.new // 2) * per_token
                    distinct = len(set(tasks))  # the prefixes a step's rows attend to
                    ideal = distinct * P * per_token + tokens
                    per_row, grouped = n * P * per_token + tokens, ideal
                    rows.append((P, k, ratio, per_row / ideal, grouped / ideal))
                    print(
                        f"  P = {P:>4}, {k:>2} tasks: grouped / per-row throughput {ratio:.3f}; key/value bytes "
                        f"read / ideal (modelled): per-row {per_row / ideal:.2f}x, grouped {grouped / ideal:.2f}x",
                        flush=True,
                    )
    finally:
        attention.CASCADE = saved
    report["cascade"] = rows


async def roofline(b: Bench, report: dict) -> None:
    """Decode steps of 64 rows (4 tasks, P = --prefix) timed on the engine alone, as a fraction of the device's
    memory bandwidth: a decode step must read every weight once and the key/values its rows attend to."""
    from service.runtime import EngineRequest, StepPlan
    from service.runtime.engine import Engine

    a = b.args
    dev = torch.device(a.device)
    engine = Engine(b.backbone, max_rows=64, device_cache_bytes=1024**3)
    arts = [replace(random_artifact(f"roof{i}", b.fp, a.prefix, i), version=1) for i in range(4)]
    prompt, new = a.prompt, max(a.new, 8)
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times: list[float] = []
    for r in range(2):  # the first round warms the allocator and kernels
        reqs = [
            EngineRequest.generate(f"roof{r}-{i}", b.prompts[i % len(b.prompts), :prompt].tolist(), arts[i % 4], params)
            for i in range(64)
        ]
        engine.load(reqs)
        engine.step(StepPlan(tuple(reqs)))  # prefill and the first token
        while engine.running:
            prefilling = engine.batch is not None and bool(engine.batch.prefilling)  # long prompts: chunked
            sync()
            t0 = time.perf_counter()
            engine.step(StepPlan(()))
            sync()
            if r and not prefilling:
                times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    elem = torch.empty((), dtype=getattr(torch, a.dtype)).element_size()
    # Every weight is read once a step, but of the input and position embeddings only the rows' entries (an input
    # embedding tied to the LM head is read whole, as the head).
    model = b.model
    sparse = {id(model.get_input_embeddings().weight)} - {id(model.get_output_embeddings().weight)}
    sparse |= {id(m.weight) for name, m in model.named_modules() if name.endswith("wpe")}
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in sparse)
    per_token = 2 * b.fp.num_layers * b.fp.num_kv_heads * b.fp.head_dim * elem  # key/value bytes of one token
    kv = (4 * a.prefix + 64 * (prompt + new // 2)) * per_token  # unique prefixes + the rows' tokens, mid-output
    needed = weights + kv
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        card = name.removeprefix("NVIDIA ")  # a whole-word match: "GH200 480GB" is not an H200
        known = (v for k, v in HBM_GBPS.items() if re.search(rf"(^|\s){re.escape(k)}($|\s)", card))
        gbps = a.hbm_gbps or next(known, None)
        source = f"{name}, {'given' if a.hbm_gbps else 'vendor figure'}"
    else:
        x = torch.empty(64 * 1024**2 // 4, dtype=torch.float32)
        y = torch.empty_like(x)
        best = best_time(lambda: y.copy_(x), "cpu")
        gbps, source = 2 * x.numel() * 4 / best / 1e9, "a 256 MiB copy on this CPU (read + write)"
    achieved = needed / step / 1e9
    fraction = achieved / gbps if gbps else None
    report["roofline"] = (step, needed, achieved, gbps, fraction, source)
    shown = f"{fraction:.0%}" if fraction is not None else "unknown bandwidth (--hbm-gbps)"
    print(
        f"  decode step {step * 1e3:.2f} ms, {needed / 1e6:.1f} MB to read (weights {weights / 1e6:.1f} MB): "
        f"{achieved:.1f} GB/s of {gbps or 0:.0f} GB/s ({source}): {shown}",
        flush=True,
    )


async def first_request(b: Bench, report: dict) -> None:
    """Latency of the first request a freshly started stack serves vs the median of the same request warm."""
    a = b.args
    (task,) = await b.tasks(1, a.prefix)
    params = SamplingParams(max_new_tokens=a.new, ignore_eos=True)
    prompt = b.prompts[0, : a.prompt].tolist()
    firsts, warms = [], []
    for _ in range(3):  # fresh stacks (engine, host cache): the process itself is warm after the first
        async with b.stack() as sched:
            t0 = time.perf_counter()
            await sched.submit(task, prompt, params).result()
            firsts.append(time.perf_counter() - t0)
            for _ in range(max(3, a.repeats)):
                t0 = time.perf_counter()
                await sched.submit(task, prompt, params).result()
                warms.append(time.perf_counter() - t0)
    first, warm = firsts[0], statistics.median(warms)
    report["first"] = (first, warm, first / warm)
    print(
        f"  first request of the process {first * 1e3:.1f} ms (of a later fresh stack: "
        f"{statistics.median(firsts[1:]) * 1e3:.1f} ms), warm {warm * 1e3:.1f} ms: {first / warm:.2f}x",
        flush=True,
    )


async def compile_step(b: Bench, report: dict) -> None:
    """The compiled decode step (runtime/compiled.py) against the eager one, on engines driven directly."""
    import os

    cache_dir, before = tempfile.mkdtemp(prefix="ps-inductor-"), os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # cold: every graph compiled, nothing reused from a past run
    try:
        await _compile_step(b, report)
    finally:
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
        shutil.rmtree(cache_dir, ignore_errors=True)


async def _compile_step(b: Bench, report: dict) -> None:
    from service.runtime import EngineRequest, StepPlan
    from service.runtime.compiled import Key, batch_buckets, prefix_bucket, slot_bucket, up
    from service.runtime.engine import Engine

    a = b.args
    dev = torch.device(a.device)
    rows = max(a.compile_batches)
    kw = dict(max_rows=rows, device_cache_bytes=256 * 1024**2)
    arts = [replace(random_artifact(f"comp{i}", b.fp, a.prefix, i), version=1) for i in range(4)]
    params = SamplingParams(max_new_tokens=a.new, ignore_eos=True)
    # The cache grows to the power of two over prompt + new tokens: every decode step reads that slot bucket.
    S = slot_bucket(a.prompt + a.new, b.backbone.max_positions or 4096)
    buckets = batch_buckets(rows)
    keys = sorted({Key(up(n, buckets), prefix_bucket(a.prefix), S) for n in a.compile_batches})

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def request(engine: Engine, tag: str, n: int) -> list[float]:
        """n rows over the 4 tasks, prefilled together, then decoded to the end: each decode step's seconds."""
        reqs = [
            EngineRequest.generate(
                f"{tag}-{i}", b.prompts[i % len(b.prompts), : a.prompt].tolist(), arts[i % 4], params
            )
            for i in range(n)
        ]
        engine.load(reqs)
        engine.step(StepPlan(tuple(reqs)))
        times = []
        while engine.running:
            sync()
            t0 = time.perf_counter()
            engine.step(StepPlan(()))
            sync()
            times.append(time.perf_counter() - t0)
        return times

    fast = Engine(b.backbone, compile=True, **kw)
    assert fast.compiled is not None
    t0 = time.perf_counter()
    per_key = [(key, fast.compiled.warm(key)) for key in keys]
    warm_s = time.perf_counter() - t0
    for key, sec in per_key:
        print(f"  compile B={key.B:>3} P={key.P} S={key.S}: {sec:6.1f} s", flush=True)
    # First request of a fresh engine (its prefix cold, its buffers new) whose graphs are warm, vs the same warm.
    first_engine = Engine(b.backbone, compile=True, **kw)
    assert first_engine.compiled is not None
    for key in keys:
        first_engine.compiled.warm(key)  # dynamo's cache already has them: seconds of guards, not a compile
    t0 = time.perf_counter()
    request(first_engine, "first", 1)
    first = time.perf_counter() - t0
    warms = []
    for r in range(max(3, a.repeats)):
        t0 = time.perf_counter()
        request(first_engine, f"again{r}", 1)
        warms.append(time.perf_counter() - t0)
    warm = statistics.median(warms)
    print(f"  first request (graphs warm) {first * 1e3:.1f} ms, warm {warm * 1e3:.1f} ms: {first / warm:.2f}x")
    eager = Engine(b.backbone, **kw)
    steps = []
    for n in a.compile_batches:
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for r in range(3):  # interleaved; the first round warms allocators
            for name, engine in (
                (("eager", eager), ("compiled", fast)) if r % 2 == 0 else (("compiled", fast), ("eager", eager))
            ):
                t = request(engine, f"{name}{n}-{r}", n)
                if r:
                    times[name] += t
        e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
        steps.append((n, e, c))
        print(
            f"  decode step, {n:>3} rows: eager {e * 1e3:7.2f} ms, compiled {c * 1e3:7.2f} ms: {e / c:.2f}x", flush=True
        )
    assert fast.compiled.steps.get("no graph for the shape", 0) == 0, fast.compiled.steps
    report["compile"] = {
        "keys": [[*k, sec] for k, sec in per_key],
        "warm_s": warm_s,
        "first": (first, warm),
        "steps": steps,
    }


# -- report ------------------------------------------------------------------------------------------------------
def summary(report: dict, args: argparse.Namespace) -> None:
    print("\nfigure                                                      value     goal")
    for (many, few), ratio in report.get("pairs", {}).items():
        label = f"{many} tasks vs {few}, every prefix resident"
        print(f" {label:<58}{ratio:>6.3f}   >= 0.97")
    if "churn" in report:
        ratio = report["churn"][2]
        print(f" {args.churn_tasks} tasks vs 5 under cache churn                          {ratio:>6.3f}   >= 0.90")
    if "peft" in report:
        ours, theirs, achieved, peak = report["peft"]
        print(
            f" ours vs PEFT, {args.peft_tasks} tasks                                     {ours / theirs:>6.1f}x  >= 10x"
        )
        label = f"achieved FLOP/s / {SHORT_DTYPE[args.dtype]} GEMM peak"
        print(f" {label:<58}{achieved / peak:>6.0%}   >= 50%   ({achieved / 1e9:.1f} of {peak / 1e9:.1f} GFLOP/s)")
    if "bare" in report:
        ratio = report["bare"][2]
        print(f" cost of serving prefixes (1 - 64 tasks / bare)            {1 - ratio:>6.1%}   <= 3%")
    if "bias" in report:
        ratio = report["bias"][2]
        print(f" bias tasks mixed with prefix tasks / prefix tasks alone   {ratio:>6.3f}   >= 0.95")
        print(f" 64 bias tasks / bare backbone (the hooks' cost)            {report['bias'][5]:>6.3f}")
    if "lora" in report:
        _, _, tax, _, _, mixed_ratio, tax_best, mixed_best, _ = report["lora"]
        label = f"LoRA tax: 1 - 64 LoRA tasks (rank {args.lora_rank}) / bare backbone"
        print(f" {label:<58}{tax:>6.1%}   <= 15%   (best of runs: {tax_best:.1%})")
        label = "32 LoRA + 32 prefix tasks mixed / 64 prefix tasks alone"
        print(f" {label:<58}{mixed_ratio:>6.3f}            (best of runs: {mixed_best:.3f})")
    if "sampling" in report:
        ratio = report["sampling"][2]
        print(f" penalties + top logprobs + JSON schema mixed / plain rows  {ratio:>6.3f}   >= 0.9")
    if "memory" in report:
        for label, _, _, peak, mean in report["memory"]:
            print(f" key/value bytes held / ideal, {label:<18}        {peak:>6.2f}x  <= 1.1x (mean {mean:.2f}x)")
    if "cascade" in report:
        for P, k, _, per_row, grouped in report["cascade"]:
            if (P, k) == (128, 4):
                label = "key/value bytes read per decode step / ideal (modelled)"
                print(f" {label:<58}{grouped:>6.2f}x  <= 1.2x   (per-row reads: {per_row:.2f}x)")
        for P, k, ratio, per_row, grouped in report["cascade"]:
            label = f"grouped / per-row decode, P = {P}, {k} tasks"
            print(f" {label:<58}{ratio:>6.3f}   (bytes read / ideal {per_row:.2f}x -> {grouped:.2f}x; <= 1.2x)")
    if "roofline" in report:
        _, _, achieved, gbps, fraction, _ = report["roofline"]
        shown = f"{fraction:>6.0%}" if fraction is not None else "   n/a"
        label = "decode step's bytes / time / memory bandwidth"
        print(f" {label:<58}{shown}   ({achieved:.0f} of {gbps or 0:.0f} GB/s)")
    if "first" in report:
        label = "first request after start / warm (eager: nothing compiled)"
        print(f" {label:<58}{report['first'][2]:>6.2f}x  <= 2x")
    if "compile" in report:
        c = report["compile"]
        first, warm = c["first"]
        label = "compiled: first request after start (graphs warm) / warm"
        print(f" {label:<58}{first / warm:>6.2f}x  <= 2x   (warming {len(c['keys'])} graphs: {c['warm_s']:.0f} s)")
        for n, e, cs in c["steps"]:
            label = f"compiled / eager decode step time, {n} rows"
            print(f" {label:<58}{cs / e:>6.2f}    ({cs * 1e3:.2f} vs {e * 1e3:.2f} ms)")
    if "stall" in report:
        for label, _, _, p99, worst in report["stall"]:
            print(f" decode stall p99 / max, {label:<10}                   {p99 * 1e3:>6.1f} / {worst * 1e3:.0f} ms")


def plot(report: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.plots)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if "hosted" in report:
        ks = [k for k, _, _ in report["hosted"]]
        axes[0].plot(ks, [r for _, _, r in report["hosted"]], marker="o")
        axes[0].axhline(0.97, ls="--", c="gray", lw=1)
        axes[0].set(xscale="log", xlabel="tasks hosted", ylabel="throughput / 1 task", ylim=(0.5, 1.2))
        axes[0].set_title("mixing and hosting tasks")
    if "prefix" in report:
        ps = [p for p, _ in report["prefix"]]
        axes[1].plot(ps, [t for _, t in report["prefix"]], marker="o")
        axes[1].set_xscale("log", base=2)
        axes[1].set_xticks(ps, [str(p) for p in ps])
        axes[1].minorticks_off()
        axes[1].set(xlabel="prefix length P", ylabel="generated tok/s", ylim=(0, None))
        axes[1].set_title("prefix length (64 tasks)")
    bars, labels = [], []
    if "churn" in report:
        bars += [1.0, report["churn"][2]]
        labels += ["5 tasks", f"{args.churn_tasks} tasks\n(churn)"]
    if "bare" in report:
        bars += [report["bare"][2]]
        labels += ["64 tasks\nvs bare"]
    if "bias" in report:
        bars += [report["bias"][2]]
        labels += ["bias tasks\nmixed in"]
    if bars:
        axes[2].bar(labels, bars, color=["C0", "C1", "C2", "C4"][: len(bars)])
        axes[2].axhline(0.8, ls="--", c="gray", lw=1)
        axes[2].set(ylabel="throughput ratio", ylim=(0, 1.2))
        axes[2].set_title("cache churn, cost of prefixes and biases")
    fig.tight_layout()
    fig.savefig(out / "engine.png", dpi=110)
    if "stall" in report:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        labels = [r[0] for r in report["stall"]]
        ax.bar(labels, [r[3] * 1e3 for r in report["stall"]], color=["C0", "C3"])
        ax.set(ylabel="inter-token p99 (ms)", title="decode stall while long prompts arrive")
        fig.tight_layout()
        fig.savefig(out / "stall.png", dpi=110)
    print(f"plots: {out / 'engine.png'}" + (f", {out / 'stall.png'}" if "stall" in report else ""))


async def main(args: argparse.Namespace) -> dict:
    b = Bench(args)
    print(
        f"backbone: {args.arch} random, {args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab "
        f"{args.vocab}, {args.dtype} on {args.device}; torch threads {torch.get_num_threads()}; "
        f"{args.requests} requests of {args.prompt} + {args.new} tokens, P = {args.prefix}, max batch {args.max_batch}"
    )
    report: dict = {}
    runners = {
        "first": first_request,  # first: only a process that has served nothing shows a cold start
        "hosted": hosted,
        "prefix": prefix_lengths,
        "churn": churn,
        "bare": bare,
        "bias": bias,
        "sampling": sampling_features,
        "memory": memory,
        "stall": stall,
        "loads": loads,
        "cascade": cascade,
        "roofline": roofline,
        "lora": lora,
        "compile": compile_step,
        "peft": peft,  # last: PEFT wraps the model
    }
    try:
        for name, run in runners.items():
            if name in args.only:
                print(f"[{name}]", flush=True)
                await run(b, report)
    finally:
        await b.close()
    summary(report, args)
    plot(report, args)
    saved = {k: v for k, v in report.items() if k != "pairs"}
    saved["pairs"] = [[many, few, ratio] for (many, few), ratio in report.get("pairs", {}).items()]
    (Path(args.plots) / "engine.json").write_text(json.dumps(saved, default=str, indent=1))
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(parse_args()))
