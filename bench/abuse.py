"""Soak and abuse: well-behaved clients' latency with and without hostile traffic, measured side by side in one run.

A real `python -m service` process (keys set, a tiny random Llama saved to a temporary directory, its own embedded
Redis) serves generation over many tasks. Phase A runs only the well-behaved load: `--clients` concurrent clients
on kept-alive connections, each sending greedy /v1/generate requests round-robin over `--tasks` tasks. Phase B runs
the same load while a hostile client, in its own process, loops over: oversized declared bodies and 8 MiB chunked
bodies (with and without a key), 200,000-character prompts, the largest allowed stop lists and over-long ones,
floods of unknown task names, deeply nested JSON, and a few hundred slow-header connections.

Printed: requests served, 5xx answers, p50/p99 latency of the well-behaved clients in each phase and their ratio, the
server's RSS before, after the abuse and after a short settle, and what the hostile client got back. A bar chart of
the latencies goes to bench/plots/abuse.png.

    python bench/abuse.py                      # 20 s per phase
    python bench/abuse.py --seconds 60 --tasks 200
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing as mp
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
USER, ADMIN = "user-key", "admin-key"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    p.add_argument("--clients", type=int, default=8, help="concurrent well-behaved clients")
    p.add_argument("--tasks", type=int, default=64)
    p.add_argument("--new", type=int, default=8, help="new tokens per well-behaved request")
    p.add_argument("--slow", type=int, default=300, help="slow-header connections the hostile client holds")
    p.add_argument("--threads", type=int, default=1, help="PREFIXSERVE_TORCH_THREADS of the server")
    p.add_argument("--plot", default=str(ROOT / "bench" / "plots" / "abuse.png"))
    return p.parse_args(argv)


# -- the server ----------------------------------------------------------------------------------------------------
def save_backbone(path: Path) -> None:
    """A tiny random Llama (4 layers, hidden 256, GQA 8/2) and a word-level tokenizer over "w0".."w1023"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_hidden_layers=4,
        vocab_size=1024,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, 1024)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)


def start_server(work: Path, port: int, threads: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "PREFIXSERVE_BACKBONE": str(work / "backbone"),
        "PREFIXSERVE_DATA_DIR": str(work / "redis"),
        "PREFIXSERVE_API_KEYS": USER,
        "PREFIXSERVE_ADMIN_KEYS": ADMIN,
        "PREFIXSERVE_TORCH_THREADS": str(threads),
        "PREFIXSERVE_LOG_LEVEL": "warning",
        "HF_HUB_OFFLINE": "1",
    }
    log = open(work / "server.log", "wb")  # noqa: SIM115 - the child writes it
    return subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=log
    )


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


def publish_tasks(url: str, n: int, work: Path) -> list[str]:
    from transformers import AutoConfig

    from prefix_store import BackboneFingerprint, PrefixArtifact, encode

    fp = BackboneFingerprint.from_config(AutoConfig.from_pretrained(work / "backbone"))
    names = [f"task-{i}" for i in range(n)]
    g = torch.Generator().manual_seed(0)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60) as c:
        for name in names:
            kv = torch.randn(fp.num_layers, 2, fp.num_kv_heads, 16, fp.head_dim, generator=g)
            blob = encode(PrefixArtifact(task=name, method="p_tuning_v2", fingerprint=fp, kv=kv))
            r = c.put(f"/v1/tasks/{name}", files={"artifact": ("a.safetensors", blob)})
            r.raise_for_status()
    return names


def rss_mb(proc: subprocess.Popen) -> float:
    return psutil.Process(proc.pid).memory_info().rss / 1024**2


# -- the well-behaved load -----------------------------------------------------------------------------------------
async def good_load(url: str, tasks: list[str], clients: int, seconds: float, new: int) -> dict:
    latencies: list[float] = []
    statuses: collections.Counter = collections.Counter()
    end = time.monotonic() + seconds

    async def client(i: int) -> None:
        rng = random.Random(i)
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {USER}"}, timeout=60) as c:
            n = i
            while time.monotonic() < end:
                body = {
                    "task": tasks[n % len(tasks)],
                    "prompt": " ".join(f"w{rng.randrange(4, 1024)}" for _ in range(16)),
                    "max_new_tokens": new,
                }
                t0 = time.perf_counter()
                try:
                    r = await c.post("/v1/generate", json=body)
                    statuses[r.status_code] += 1
                except httpx.HTTPError as e:
                    statuses[type(e).__name__] += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                n += clients

    await asyncio.gather(*(client(i) for i in range(clients)))
    return {"latencies": latencies, "statuses": statuses}


# -- the hostile client (its own process) --------------------------------------------------------------------------
def _send(port: int, data: bytes, body: bytes = b"", timeout: float = 10) -> int:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(data)
            try:
                if body:
                    s.sendall(body)
            except OSError:
                pass
            head = s.recv(64)
            return int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1") else 0
    except (OSError, ValueError, IndexError):
        return -1


def _chunked(n: int, chunk: int = 1 << 16) -> bytes:
    piece = b"%x\r\n" % chunk + b"a" * chunk + b"\r\n"
    return piece * (n // chunk) + b"0\r\n\r\n"


def hostile(port: int, seconds: float, slow: int, out: mp.Queue) -> None:
    """Loops over the attacks until `seconds` pass; reports how often each attack got which status."""
    results: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    key = f"Authorization: Bearer {USER}\r\n".encode()
    post = b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    big_chunked = _chunked(8 * 1024**2)

    def json_body(obj: object) -> bytes:
        data = json.dumps(obj).encode()
        return post + key + b"Content-Length: %d\r\n\r\n" % len(data) + data

    attacks = {
        "declared 1 GiB, no key": lambda: _send(port, post + b"Content-Length: 1073741824\r\n\r\n"),
        "chunked 8 MiB, no key": lambda: _send(port, post + b"Transfer-Encoding: chunked\r\n\r\n", big_chunked),
        "chunked 8 MiB, key": lambda: _send(port, post + key + b"Transfer-Encoding: chunked\r\n\r\n", big_chunked),
        "200k-char prompt": lambda: _send(
            port, json_body({"task": "base", "prompt": "w5 " * 66_666, "max_new_tokens": 1})
        ),
        "16 stop strings x 256": lambda: _send(
            port, json_body({"task": "base", "prompt": "w5", "max_new_tokens": 1, "stop": ["x" * 256] * 16})
        ),
        "500,000 stop strings": lambda: _send(
            port, json_body({"task": "base", "prompt": "w5", "max_new_tokens": 1, "stop": ["ab"] * 500_000})
        ),
        "unknown task": lambda: _send(
            port, json_body({"task": f"ghost-{random.getrandbits(64):x}", "prompt": "w5", "max_new_tokens": 1})
        ),
        "nested JSON": lambda: _send(
            port, post + key + b"Content-Length: 200000\r\n\r\n" + b"[" * 100_000 + b"]" * 100_000
        ),
    }
    held: list[socket.socket] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for name, attack in attacks.items():
            results[name][attack()] += 1
        while len(held) < slow:  # slow-header connections, replaced as the server closes them
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                s.setblocking(False)
                held.append(s)
            except OSError:
                results["slow headers"]["refused"] += 1
                break
        still = []
        for s in held:
            try:
                if s.recv(1) == b"":
                    results["slow headers"]["closed by server"] += 1
                    s.close()
                    continue
            except BlockingIOError:
                pass
            except OSError:
                results["slow headers"]["closed by server"] += 1
                s.close()
                continue
            still.append(s)
        held = still
    for s in held:
        s.close()
    out.put({k: dict(v) for k, v in results.items()})


# -- the run ---------------------------------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))


def summary(name: str, res: dict) -> dict:
    lat = sorted(res["latencies"])
    five = sum(n for s, n in res["statuses"].items() if isinstance(s, int) and s >= 500)
    return {
        "phase": name,
        "served": res["statuses"][200],
        "5xx": five,
        "other": {str(s): n for s, n in res["statuses"].items() if s != 200},
        "p50_ms": 1000 * percentile(lat, 50),
        "p99_ms": 1000 * percentile(lat, 99),
    }


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = range(2)
    ax.bar([x - 0.2 for x in xs], [r["p50_ms"] for r in rows], width=0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], [r["p99_ms"] for r in rows], width=0.4, label="p99")
    ax.set_xticks(list(xs), [r["phase"] for r in rows])
    ax.set_ylabel("well-behaved latency (ms)")
    ax.set_title("/v1/generate with and without abuse")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="ps-abuse-"))
    save_backbone(work / "backbone")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = start_server(work, port, args.threads)
    try:
        wait_ready(url, proc)
        tasks = publish_tasks(url, args.tasks, work)
        asyncio.run(good_load(url, tasks, args.clients, 3, args.new))  # warm-up: every prefix resident
        rss_before = rss_mb(proc)
        base = summary("baseline", asyncio.run(good_load(url, tasks, args.clients, args.seconds, args.new)))
        queue: mp.Queue = mp.Queue()
        attacker = mp.Process(target=hostile, args=(port, args.seconds, args.slow, queue))
        attacker.start()
        attacked = summary("under abuse", asyncio.run(good_load(url, tasks, args.clients, args.seconds, args.new)))
        hostile_results = queue.get(timeout=120)
        attacker.join(30)
        rss_after = rss_mb(proc)
        time.sleep(5)
        rss_settled = rss_mb(proc)
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"server: tiny Llama (4 layers, hidden 256), {args.tasks} tasks, {args.clients} clients, {args.seconds:g}s")
    print(f"{'phase':<12} {'served':>7} {'5xx':>5} {'p50 ms':>8} {'p99 ms':>8}  other statuses")
    for r in (base, attacked):
        print(f"{r['phase']:<12} {r['served']:>7} {r['5xx']:>5} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}  {r['other']}")
    print(f"p50 ratio (abuse / baseline): {attacked['p50_ms'] / base['p50_ms']:.2f}")
    print(f"p99 ratio (abuse / baseline): {attacked['p99_ms'] / base['p99_ms']:.2f}")
    print(
        f"server RSS: {rss_before:.0f} MB before, {rss_after:.0f} MB after the abuse, {rss_settled:.0f} MB settled "
        f"({rss_settled / rss_before:.2f}x)"
    )
    print("hostile client got:")
    for name, counts in hostile_results.items():
        print(f"  {name:<24} {counts}")
    plot([base, attacked], args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main(parse_args())
