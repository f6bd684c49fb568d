"""The ways the LowRankTable applies a forward's LoRA updates, side by side (service/runtime/low_rank.py): gathered
(the adapted rows' factors gathered, two batched matmuls; the gathered factors kept for the next forward of the same
rows), regathered (the same, gathered again in every forward), and grouped (one matmul pair per task over its rows),
against the same forward with no LoRA row, on a random-initialised Llama-shaped (or GPT-2-shaped) backbone's body.

Shapes: decode (B rows of one token) and prefill (B rows of T tokens), the rows spread over 1 .. B tasks of rank r
on q_proj and v_proj (GPT-2: its fused c_attn). Printed: milliseconds per forward, the best of --repeats timings
taken in turn (on one thread, the thread's CPU time), and the tax over the bare forward. What it decides:
GROUPED_MIN_ROWS_PER_TASK, the rows per task from which the grouped path is taken, and whether keeping the gathered
factors (KEEP_GATHERED_BYTES) pays.

    python bench/lora_paths.py                          # CPU-sized defaults, a few minutes on one core
    python bench/lora_paths.py --arch gpt2 --hidden 256 --rows 64    # bench/engine.py's default model
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers as tf

from service.runtime import low_rank, wrap_model
from service.runtime.low_rank import LowRankTable


def forward_s(bb, table: LowRankTable, ids: torch.Tensor, slots: torch.Tensor | None) -> float:
    # On one thread the thread's CPU time: what the forward costs, less what other processes take meanwhile.
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    with torch.inference_mode():
        start = clock()
        with table.rows(slots):
            bb.body(input_ids=ids, use_cache=False)
        return clock() - start


def build(args: argparse.Namespace):
    """The random-initialised backbone and its LowRankTable, one resident task per row (rank r on the targets)."""
    torch.manual_seed(0)
    if args.arch == "gpt2":
        config = tf.GPT2Config(n_embd=args.hidden, n_layer=args.layers, n_head=args.hidden // 64, vocab_size=1000)
        model = tf.GPT2LMHeadModel(config)
    else:
        heads = args.hidden // 64
        config = tf.LlamaConfig(
            hidden_size=args.hidden,
            intermediate_size=2 * args.hidden,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            num_hidden_layers=args.layers,
            vocab_size=1000,
        )
        model = tf.LlamaForCausalLM(config)
    bb = wrap_model(model.eval(), None, name="bench")
    table = LowRankTable(bb)
    targets = [p for p in bb.linear_sizes if p.endswith(("q_proj", "v_proj", "c_attn"))]
    slots = []
    for _ in range(args.rows):
        factors = {}
        for path in targets:
            n_in, n_out = bb.linear_sizes[path]
            factors[path] = (torch.randn(args.rank, n_in) / n_in**0.5, torch.randn(n_out, args.rank) / args.rank**0.5)
        slots.append(table.alloc(factors))
    return bb, table, slots


PATHS = {  # column -> (GROUPED_MIN_ROWS_PER_TASK, KEEP_GATHERED_BYTES)
    "gathered": (10**9, low_rank.KEEP_GATHERED_BYTES),
    "regathered": (10**9, -1),  # the factors gathered again in every forward, none kept
    "grouped": (0, low_rank.KEEP_GATHERED_BYTES),
}


def main(argv: list[str] | None = None) -> dict[tuple[str, int], tuple[float, ...]]:
    """Prints the table; returns {(shape, tasks): (bare ms, gathered ms, regathered ms, grouped ms)}."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["llama", "gpt2"], default="llama")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timings of each forward; the best is shown")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bb, table, slots = build(args)
    B, r = args.rows, args.rank
    saved = low_rank.GROUPED_MIN_ROWS_PER_TASK, low_rank.KEEP_GATHERED_BYTES
    where = "c_attn" if args.arch == "gpt2" else "q/v"
    print(
        f"{args.arch}, hidden {args.hidden}, {args.layers} layers, {B} rows, rank {r} on {where}, "
        f"{args.threads} thread(s)"
    )
    print(f"{'shape':>8} {'tasks':>6} {'bare ms':>9}" + "".join(f" {name:>15}" for name in PATHS))
    report: dict[tuple[str, int], tuple[float, ...]] = {}
    try:
        for shape, T in (("decode", 1), ("prefill", args.prefill_tokens)):
            ids = torch.randint(0, 1000, (B, T))
            for n in sorted({n for n in (1, 2, 4, 8, 16, B) if n <= B}):
                rows = torch.tensor([slots[i % n] for i in range(B)])
                best = dict.fromkeys(["bare", *PATHS], float("inf"))
                forward_s(bb, table, ids, rows)  # warm
                for rep in range(args.repeats):  # interleaved, the order reversed every other time
                    for name in best if rep % 2 == 0 else reversed(best):
                        if name != "bare":
                            low_rank.GROUPED_MIN_ROWS_PER_TASK, low_rank.KEEP_GATHERED_BYTES = PATHS[name]
                        best[name] = min(best[name], forward_s(bb, table, ids, None if name == "bare" else rows))
                bare, *times = (1000 * s for s in best.values())
                cells = [f"{ms:8.2f} ({100 * (ms / bare - 1):+4.0f}%)" for ms in times]
                print(f"{shape:>8} {n:>6} {bare:9.2f}" + "".join(f" {c:>15}" for c in cells), flush=True)
                report[(shape, n)] = (bare, *times)
    finally:
        low_rank.GROUPED_MIN_ROWS_PER_TASK, low_rank.KEEP_GATHERED_BYTES = saved
    return report


if __name__ == "__main__":
    main()
