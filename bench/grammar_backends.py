"""Which grammar library constrains structured output: per-step overhead at batch 32, side by side in one run.

Each candidate compiles one JSON schema for a byte-level BPE tokenizer (32,000 tokens, trained here on the shared
datasets' text: no tokenizer can be downloaded), then runs decode steps for 32 rows: fill each row's allowed-token
bitmask, apply it to the (32, V) logits, advance each row's matcher by its chosen token. Reported: the compile time and
the mean time of one step, and that time as a fraction of a plain sampling step on the same logits (softmax +
draw), which is the part of a decode step constrained decoding adds to.

    .venv/bin/pip install --no-deps llguidance outlines-core xgrammar apache-tvm-ffi   # candidates, not locked
    .venv/bin/python bench/grammar_backends.py
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
B, STEPS = 32, 40
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "food": {"enum": ["English", "Italian", "French", "Japanese", "Indian"]},
        "family_friendly": {"type": "boolean"},
    },
    "required": ["name", "rating", "food", "family_friendly"],
    "additionalProperties": False,
}


def bpe_tokenizer(vocab: int = 32000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    with open(DATA / "e2e" / "trainset.csv", newline="") as f:
        for row in csv.DictReader(f):
            texts += [row["mr"], row["ref"]]
    for name in ("sst2", "mrpc"):
        texts += (DATA / name / "train.tsv").read_text().splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def plain_step(logits: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0]


def run_llguidance(hf, logits):
    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(hf)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in range(B)]
    compile_s = time.perf_counter() - t0
    mask = llguidance.torch.allocate_token_bitmask(B, lltok.vocab_size)

    def step(x: torch.Tensor, g: torch.Generator) -> None:
        for i, m in enumerate(matchers):
            llguidance.torch.fill_next_token_bitmask(m, mask, i)
        llguidance.torch.apply_token_bitmask_inplace(x, mask)
        for m, t in zip(matchers, plain_step(x, g).tolist(), strict=True):
            m.consume_token(t) if not m.is_stopped() else None

    return compile_s, step


def run_xgrammar(hf, logits):
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=logits.shape[-1])
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(B)]
    compile_s = time.perf_counter() - t0
    mask = xgr.allocate_token_bitmask(B, info.vocab_size)

    def step(x: torch.Tensor, g: torch.Generator) -> None:
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(mask, i)
        xgr.apply_token_bitmask_inplace(x, mask)
        for m, t in zip(matchers, plain_step(x, g).tolist(), strict=True):
            m.accept_token(t) if not m.is_terminated() else None

    return compile_s, step


def run_outlines_core(hf, logits):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    tokens: dict[bytes, list[int]] = {}
    eos = hf.eos_token_id
    for text, i in hf.get_vocab().items():
        if i != eos:
            tokens.setdefault(bytes(byte_of[c] for c in text), []).append(i)
    vocab = Vocabulary(eos, tokens)
    index = Index(build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=""), vocab)
    guides = [Guide(index) for _ in range(B)]
    compile_s = time.perf_counter() - t0
    V = logits.shape[-1]

    def step(x: torch.Tensor, g: torch.Generator) -> None:
        allowed = torch.zeros(B, V, dtype=torch.bool)
        for i, gd in enumerate(guides):
            allowed[i, gd.get_tokens()] = True
        x.masked_fill_(~allowed, float("-inf"))
        for gd, t in zip(guides, plain_step(x, g).tolist(), strict=True):
            gd.advance(t) if not gd.is_finished() else None

    return compile_s, step


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character map (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def timed(step, logits: torch.Tensor) -> float:
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(STEPS):
        x = logits.clone()
        t0 = time.perf_counter()
        step(x, g)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    torch.set_num_threads(1)
    hf = bpe_tokenizer()
    V = len(hf)
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(1))
    base = timed(plain_step, logits)
    print(f"byte-level BPE, V = {V}, batch {B}; plain sampling step (softmax + draw): {base * 1e3:.2f} ms (median)")
    print("| library | compile (s) | step (ms, median) | step / plain sampling step |")
    print("|---|---:|---:|---:|")
    for name, fn in (("llguidance", run_llguidance), ("xgrammar", run_xgrammar), ("outlines-core", run_outlines_core)):
        try:
            compile_s, step = fn(hf, logits)
        except ImportError as e:
            print(f"| {name} | not installed ({e.name}) | | |")
            continue
        t = timed(step, logits)
        print(f"| {name} | {compile_s:.2f} | {t * 1e3:.2f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
