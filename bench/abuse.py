"""Soak and abuse: well-behaved clients' latency with and without hostile traffic, measured side by side in one run.

A real `python -m service` process (keys set, a tiny random Llama with a byte-level tokenizer saved to a temporary
directory, its own embedded Redis) serves generation over many tasks. Phase A runs only the well-behaved load:
`--clients` concurrent clients on kept-alive connections, each sending greedy /v1/generate requests round-robin over
`--tasks` tasks. Phase B runs the same load while two hostile processes attack. The first loops over: oversized
declared bodies and 8 MiB chunked bodies (with and without a key), 200,000-character prompts, the largest allowed stop
lists and over-long ones, floods of unknown task names, deeply nested JSON, and a few hundred slow-header
connections. The second loops the same way over: pathological JSON schemas (a distinct huge regex repetition per
request, 10,000 required properties, a $ref loop), chats with tasks whose chat templates loop, blow up memory or
compute a huge power once the conversation has three messages, and echo fan-outs (echo + 20 alternatives + n 8 over
32 prompts of 1,000 tokens).

A second server, a tiny ViT, runs the same two phases for images: well-behaved clients embed small images while the
first hostile process and a second one attack it, the second with pairs of requests of 16 images of 4096x4096 and
1 x 16,777,216 strips.

Printed per server: requests served, 5xx answers, p50/p99 latency of the well-behaved clients in each phase and their
ratio, the server's RSS before, after the abuse and after a short settle, what the hostile clients got back, and the
pass criteria (p99 under abuse <= 2x baseline, RSS growth <= 10%, no unexpected 5xx: a chat whose task's template
fails is answered 500 by design). A bar chart of the latencies goes to bench/plots/abuse.png.

    python bench/abuse.py                      # 20 s per phase, both servers
    python bench/abuse.py --seconds 60 --tasks 200 --servers text
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
    p.add_argument("--servers", nargs="+", choices=["text", "image"], default=["text", "image"])
    p.add_argument(
        "--attacks", nargs="+", choices=["basic", "heavy"], default=["basic", "heavy"], help="hostile processes to run"
    )
    p.add_argument("--plot", default=str(ROOT / "bench" / "plots" / "abuse.png"))
    return p.parse_args(argv)


# -- the servers ---------------------------------------------------------------------------------------------------
BYTE_EOS = 256  # the byte-level tokenizer's end of text, after the 256 byte tokens


def save_backbone(path: Path) -> None:
    """A tiny random Llama (4 layers, hidden 256, GQA 8/2) and a byte-level BPE tokenizer without merges (every byte
    a token, so a grammar can constrain it to any JSON)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_hidden_layers=4,
        vocab_size=BYTE_EOS + 8,
        max_position_embeddings=2048,
        pad_token_id=BYTE_EOS,
        bos_token_id=BYTE_EOS,
        eos_token_id=BYTE_EOS,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))} | {"<|endoftext|>": BYTE_EOS}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(path)


def save_vit(path: Path) -> None:
    """A tiny random ViT (32x32 images, 4 layers, hidden 128) with its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=4, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256
    )
    ViTModel(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)


def start_server(work: Path, backbone: Path, port: int, threads: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "PREFIXSERVE_BACKBONE": str(backbone),
        "PREFIXSERVE_DATA_DIR": str(work / f"redis-{port}"),
        "PREFIXSERVE_API_KEYS": USER,
        "PREFIXSERVE_ADMIN_KEYS": ADMIN,
        "PREFIXSERVE_TORCH_THREADS": str(threads),
        "PREFIXSERVE_LOG_LEVEL": "warning",
        "HF_HUB_OFFLINE": "1",
    }
    log = open(work / f"server-{port}.log", "wb")  # noqa: SIM115 - the child writes it
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


def publish_tasks(url: str, n: int, backbone: Path) -> list[str]:
    from transformers import AutoConfig

    from prefix_store import BackboneFingerprint, PrefixArtifact, encode

    fp = BackboneFingerprint.from_config(AutoConfig.from_pretrained(backbone))
    names = [f"task-{i}" for i in range(n)]
    g = torch.Generator().manual_seed(0)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60) as c:
        for name in names:
            kv = torch.randn(fp.num_layers, 2, fp.num_kv_heads, 16, fp.head_dim, generator=g)
            blob = encode(PrefixArtifact(task=name, method="p_tuning_v2", fingerprint=fp, kv=kv))
            r = c.put(f"/v1/tasks/{name}", files={"artifact": ("a.safetensors", blob)})
            r.raise_for_status()
        for name, template in TEMPLATES.items():  # harmless on the upload's check, hostile from the third message
            kv = torch.randn(fp.num_layers, 2, fp.num_kv_heads, 4, fp.head_dim, generator=g)
            blob = encode(PrefixArtifact(task=name, method="p_tuning_v2", fingerprint=fp, kv=kv))
            r = c.put(f"/v1/tasks/{name}", files={"artifact": ("a", blob)}, data={"chat_template": template})
            r.raise_for_status()
    return names


PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
TEMPLATES = {
    "loops": "{% if messages|length > 2 %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
    "{% endfor %}{% endif %}" + PLAIN,
    "memory": "{% if messages|length > 2 %}{{ 'x' * (messages|length * 10**9) }}{% endif %}" + PLAIN,
    "power": "{% if messages|length > 2 %}{{ 7 ** (messages|length * 10**8) }}{% endif %}" + PLAIN,
}


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
                if tasks:
                    words = " ".join(f"w{rng.randrange(4, 1024)}" for _ in range(5))
                    path, body = "/v1/generate", {"task": tasks[n % len(tasks)], "prompt": words, "max_new_tokens": new}
                else:  # the image server: a small image's embedding
                    path, body = "/v1/embeddings", {"model": "base", "input": [_png(32, 32, rng.randrange(256))]}
                t0 = time.perf_counter()
                try:
                    r = await c.post(path, json=body)
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


def _png(width: int, height: int, value: int = 0, mode: str = "L") -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (width, height), value).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def hostile_heavy(port: int, seconds: float, out: mp.Queue) -> None:
    """The newer surfaces, one client looping over its attacks as fast as it is answered (like `hostile`):
    pathological schemas (the 10,000-property one 16 at once, as the finding sent it), chats through hostile
    templates, echo fan-outs. Reports how often each attack got which status."""
    results: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    three = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(10_000)}}
    wide["required"] = list(wide["properties"])
    loop = {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}
    counter = iter(range(10**9))

    def schema_body(schema: dict) -> dict:
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        return {"model": "base", "prompt": "w5 w6", "max_tokens": 8, "response_format": fmt}

    long_prompts = [[(7 * i + j) % 250 for j in range(1000)] for i in range(32)]
    attacks = {
        "schema: huge regex repetition": lambda: (
            "/v1/completions",
            schema_body({"type": "string", "pattern": f"^(a{{1000}}){{{1000 + next(counter)}}}$"}),
        ),
        "schema: 10,000 properties": lambda: ("/v1/completions", schema_body(wide)),
        "schema: $ref loop": lambda: ("/v1/completions", schema_body(loop)),
        "template: loops": lambda: ("/v1/chat/completions", {"model": "loops", "messages": three, "max_tokens": 2}),
        "template: memory": lambda: ("/v1/chat/completions", {"model": "memory", "messages": three, "max_tokens": 2}),
        "template: power": lambda: ("/v1/chat/completions", {"model": "power", "messages": three, "max_tokens": 2}),
        "echo fan-out 32x1000 n 8": lambda: (
            "/v1/completions",
            {"model": "base", "prompt": long_prompts, "n": 8, "echo": True, "logprobs": 20, "max_tokens": 1},
        ),
    }

    bursts = {"schema: 10,000 properties": 16}  # sent 16 at once, as the finding did (the others one at a time)

    async def run() -> None:
        end = time.monotonic() + seconds
        headers = {"Authorization": f"Bearer {USER}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60) as c:

            async def one(name: str, path: str, body: dict) -> None:
                try:
                    results[name][(await c.post(path, json=body)).status_code] += 1
                except httpx.HTTPError as e:
                    results[name][type(e).__name__] += 1

            while time.monotonic() < end:  # one client: each attack in turn, each burst after the last
                for name, make in attacks.items():
                    path, body = make()
                    await asyncio.gather(*(one(name, path, body) for _ in range(bursts.get(name, 1))))

    asyncio.run(run())
    out.put({k: dict(v) for k, v in results.items()})


def hostile_images(port: int, seconds: float, out: mp.Queue) -> None:
    """Image floods: requests of 16 images of 4096x4096 two at a time, 1 x 16,777,216 strips."""
    results: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    big, strip = _png(4096, 4096, mode="1"), _png(1, 16_777_216, mode="1")

    async def run() -> None:
        end = time.monotonic() + seconds
        headers = {"Authorization": f"Bearer {USER}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60) as c:

            async def one(name: str, images: list[str]) -> None:
                try:
                    r = await c.post("/v1/embeddings", json={"model": "base", "input": images})
                    results[name][r.status_code] += 1
                except httpx.HTTPError as e:
                    results[name][type(e).__name__] += 1

            while time.monotonic() < end:  # two requests of 16 at once, as the finding sent them, then a strip
                await asyncio.gather(*(one("16 images of 4096x4096", [big] * 16) for _ in range(2)))
                await one("1 x 16,777,216 strip", [strip])

    asyncio.run(run())
    out.put({k: dict(v) for k, v in results.items()})


# Hostile requests that are answered 5xx by design: a task's broken chat template is the task's fault, not the
# caller's (500 naming it); a busy pool past its budget is a 503.
EXPECTED_5XX = {"template: loops", "template: memory", "template: power"}


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


def plot(rows: list[dict], kinds: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3 + 2 * len(kinds), 3.2))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["p50_ms"] for r in rows], width=0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], [r["p99_ms"] for r in rows], width=0.4, label="p99")
    labels = [f"{kinds[i // 2]}\n{r['phase']}" for i, r in enumerate(rows)]
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("well-behaved latency (ms)")
    ax.set_title("well-behaved clients with and without abuse")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(args: argparse.Namespace, work: Path, kind: str) -> dict:
    """One server through both phases; the measurements and what the hostile processes got."""
    backbone = work / kind
    (save_backbone if kind == "text" else save_vit)(backbone)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(work, backbone, port, args.threads)
    try:
        wait_ready(url, proc)
        tasks = publish_tasks(url, args.tasks, backbone) if kind == "text" else []
        asyncio.run(good_load(url, tasks, args.clients, 3, args.new))  # warm-up: every prefix resident
        rss_before = rss_mb(proc)
        base = summary("baseline", asyncio.run(good_load(url, tasks, args.clients, args.seconds, args.new)))
        queue: mp.Queue = mp.Queue()
        attackers = []
        if "basic" in args.attacks:
            attackers.append(mp.Process(target=hostile, args=(port, args.seconds, args.slow, queue)))
        if "heavy" in args.attacks:
            heavy = hostile_heavy if kind == "text" else hostile_images
            attackers.append(mp.Process(target=heavy, args=(port, args.seconds, queue)))
        for a in attackers:
            a.start()
        attacked = summary("under abuse", asyncio.run(good_load(url, tasks, args.clients, args.seconds, args.new)))
        hostile_results: dict = {}
        for _ in attackers:
            hostile_results |= queue.get(timeout=300)
        for a in attackers:
            a.join(30)
        rss_after = rss_mb(proc)
        time.sleep(5)
        rss_settled = rss_mb(proc)
    finally:
        proc.terminate()
        proc.wait(30)
    return {
        "kind": kind,
        "phases": [base, attacked],
        "rss": (rss_before, rss_after, rss_settled),
        "hostile": hostile_results,
    }


def report(args: argparse.Namespace, run: dict) -> bool:
    base, attacked = run["phases"]
    rss_before, rss_after, rss_settled = run["rss"]
    what = "tiny Llama (4 layers, hidden 256)" if run["kind"] == "text" else "tiny ViT (4 layers, hidden 128)"
    print(f"\nserver: {what}, {args.clients} clients, {args.seconds:g}s per phase")
    print(f"{'phase':<12} {'served':>7} {'5xx':>5} {'p50 ms':>8} {'p99 ms':>8}  other statuses")
    for r in (base, attacked):
        print(f"{r['phase']:<12} {r['served']:>7} {r['5xx']:>5} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}  {r['other']}")
    p99 = attacked["p99_ms"] / base["p99_ms"]
    growth = rss_settled / rss_before - 1
    print(f"p50 ratio (abuse / baseline): {attacked['p50_ms'] / base['p50_ms']:.2f}")
    print(f"p99 ratio (abuse / baseline): {p99:.2f}")
    print(
        f"server RSS: {rss_before:.0f} MB before, {rss_after:.0f} MB after the abuse, {rss_settled:.0f} MB settled "
        f"({rss_settled / rss_before:.2f}x)"
    )
    print("hostile clients got:")
    unexpected = base["5xx"] + attacked["5xx"]
    for name, counts in run["hostile"].items():
        print(f"  {name:<32} {counts}")
        if name not in EXPECTED_5XX:
            unexpected += sum(n for s, n in counts.items() if isinstance(s, int) and s >= 500)
    ok = p99 <= 2.0 and growth <= 0.10 and unexpected == 0
    print(
        f"pass criteria: p99 ratio {p99:.2f} <= 2.0, RSS growth {100 * growth:.1f}% <= 10%, unexpected 5xx "
        f"{unexpected} == 0: {'PASS' if ok else 'FAIL'}"
    )
    return ok


def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="ps-abuse-"))
    runs = [run_server(args, work, kind) for kind in args.servers]
    results = [report(args, run) for run in runs]
    plot([p for run in runs for p in run["phases"]], [run["kind"] for run in runs], args.plot)
    print(f"plot: {args.plot}")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main(parse_args())
