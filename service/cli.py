"""`prefixserve`: the operator's command line, over the service's HTTP API (standard library only, so it starts fast
and runs anywhere the URL is reachable).

    prefixserve tasks list
    prefixserve tasks show sst2
    prefixserve tasks upload sst2 ./peft-adapter-dir --labels neg,pos      # a PEFT directory, or an artifact file
    prefixserve tasks rollback sst2 3
    prefixserve tasks delete sst2 [--version 2]
    prefixserve tasks export sst2 sst2.safetensors [--version 2]
    prefixserve train submit job.json           # a TrainSpec as JSON (a file, or - for stdin)
    prefixserve train list [--limit 20]         # recent jobs, newest first
    prefixserve train status JOB_ID
    prefixserve train watch JOB_ID              # a progress bar until the job ends, then the version it published
    prefixserve train cancel JOB_ID             # a queued job never starts; a running one stops, unpublished

URL and key: --url / --key, or PREFIXSERVE_URL (default http://127.0.0.1:8000) and the server's own variable,
PREFIXSERVE_ADMIN_KEYS (its first key; PREFIXSERVE_ADMIN_KEY is still read, with a warning). Output: readable tables,
or --json for scripts. The options --url, --key, --json and --http-timeout go anywhere on the line
(`prefixserve tasks list --json`). Exit codes: 0 success, 1 the server refused (its error message is printed as it
is), 2 bad usage (one line on stderr), 3 the server could not be reached, 4 a watched job failed or was cancelled.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_JOB_FAILED = 0, 1, 2, 3, 4
DEFAULT_URL = "http://127.0.0.1:8000"
QUEUED_HINT_S = 5.0  # a watched job queued this long with no worker alive gets the hint below
NO_WORKER = (
    "no worker is consuming the queue: start one with `make worker` (or .venv/bin/python -m trainer worker), "
    "with the server's PREFIXSERVE_* settings"
)


class Refused(Exception):
    """The server answered with an error status: its message is shown as it is."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Unreachable(Exception):
    pass


class Client:
    def __init__(self, url: str, key: str | None, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.key = key
        self.timeout = timeout

    def call(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> bytes:
        headers = {"x-request-id": f"cli-{uuid.uuid4().hex[:12]}"}
        if self.key:
            headers["authorization"] = f"Bearer {self.key}"
        if content_type:
            headers["content-type"] = content_type
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                message = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode(errors="replace") or e.reason
            raise Refused(e.code, f"{e.code}: {message}") from None
        except (urllib.error.URLError, OSError) as e:
            raise Unreachable(f"cannot reach {self.url}: {getattr(e, 'reason', e)}") from None

    def json(self, method: str, path: str, payload: Any = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        raw = self.call(method, path, body, "application/json" if body is not None else None)
        return json.loads(raw) if raw else None

    def multipart(self, path: str, files: dict[str, tuple[str, bytes]], fields: dict[str, str]) -> Any:
        boundary = uuid.uuid4().hex
        parts: list[bytes] = []
        for name, value in fields.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
            parts.append(value.encode() + b"\r\n")
        for name, (filename, data) in files.items():
            head = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            )
            parts += [head.encode(), data, b"\r\n"]
        parts.append(f"--{boundary}--\r\n".encode())
        raw = self.call("PUT", path, b"".join(parts), f"multipart/form-data; boundary={boundary}")
        return json.loads(raw)


# -- output -------------------------------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict | list):
        return json.dumps(v, separators=(",", ":"))[:60]
    return str(v)


def progress_bar(progress: dict[str, Any] | None, width: int = 30) -> str:
    step, steps = (progress or {}).get("step", 0), (progress or {}).get("steps") or 0
    done = (progress or {}).get("done")  # the share of the nearest limit: a budget in seconds has no step count
    frac = min(1.0, step / steps) if steps else float(done) if isinstance(done, int | float) else 0.0
    bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
    extra = ""
    if progress and progress.get("loss") is not None:
        extra += f"  loss {progress['loss']:.4f}"
    dev = (progress or {}).get("val") or (progress or {}).get("dev") or {}  # the trainer's validation metrics
    extra += "".join(f"  {k} {v:.4f}" for k, v in dev.items() if isinstance(v, int | float))
    count = f"{step}/{steps}" if steps else f"{step} steps, {frac:.0%} of its time" if done is not None else f"{step}/?"
    return f"[{bar}] {count}{extra}"


# -- commands -----------------------------------------------------------------------------------------------------
def tasks_list(c: Client, a: argparse.Namespace) -> Any:
    out = c.json("GET", "/v1/tasks")
    if a.json:
        return out
    rows = [
        {
            "task": t["task"],
            "version": t["current_version"],
            "versions": len(t["versions"]),
            "method": t["current"].get("method"),
            "P": t["current"].get("num_virtual_tokens"),
            "bytes": t["current"].get("bytes"),
            "resident": t.get("resident"),
        }
        for t in out.get("tasks", [])
    ]
    return table(rows, ["task", "version", "versions", "method", "P", "bytes", "resident"])


def tasks_show(c: Client, a: argparse.Namespace) -> Any:
    out = c.json("GET", f"/v1/tasks/{_q(a.task)}")
    if a.json:
        return out
    history = out.get("history") or [out.get("current") or {}]
    rows = [
        {
            "version": h.get("version"),
            "current": h.get("version") == out.get("current_version"),
            "method": h.get("method"),
            "P": h.get("num_virtual_tokens"),
            "head": (h.get("head") or {}).get("labels"),
            "created_at": h.get("created_at"),
        }
        for h in history
    ]
    return f"task {out.get('task')}: current version {out.get('current_version')}\n" + table(
        rows, ["version", "current", "method", "P", "head", "created_at"]
    )


def tasks_upload(c: Client, a: argparse.Namespace) -> Any:
    src = Path(a.source)
    fields: dict[str, str] = {}
    if a.labels:
        fields["labels"] = a.labels
    if a.method:
        fields["method"] = a.method
    template = None
    if a.chat_template:  # a file part: the server checks it is UTF-8 text and within its size
        template = (Path(a.chat_template).name, _read(Path(a.chat_template), "--chat-template"))
    if src.is_dir():
        config, weights = src / "adapter_config.json", src / "adapter_model.safetensors"
        if not config.is_file() or not weights.is_file():
            raise UsageError(f"{src}: a PEFT directory holds adapter_config.json and adapter_model.safetensors")
        files = {
            "adapter_config": ("adapter_config.json", _read(config, "the adapter config")),
            "adapter_model": ("adapter_model.safetensors", _read(weights, "the adapter weights")),
        }
    elif src.exists():
        # Only the file's base name goes to the server: the uploader's directories are nobody else's business.
        files = {a.kind: (src.name, _read(src, "the upload"))}
    else:
        raise UsageError(f"{src}: no such file or directory")
    if template is not None:
        files["chat_template"] = template
    out = c.multipart(f"/v1/tasks/{_q(a.task)}", files, fields)
    return out if a.json else f"{out['task']} version {out['version']} is current ({out['method']})"


def tasks_rollback(c: Client, a: argparse.Namespace) -> Any:
    out = c.json("POST", f"/v1/tasks/{_q(a.task)}/rollback", {"version": a.version})
    return out if a.json else f"{a.task}: version {a.version} is current"


def tasks_delete(c: Client, a: argparse.Namespace) -> Any:
    query = f"?version={a.version}" if a.version else ""
    c.call("DELETE", f"/v1/tasks/{_q(a.task)}{query}")
    what = f"version {a.version} of {a.task}" if a.version else a.task
    return {"deleted": a.task, "version": a.version} if a.json else f"deleted {what}"


def tasks_export(c: Client, a: argparse.Namespace) -> Any:
    out = Path(a.out)
    if not out.parent.is_dir():  # checked before the download, which may be large
        raise UsageError(f"{a.out}: no such directory {str(out.parent)!r} to write into")
    if out.is_dir():
        raise UsageError(f"{a.out}: is a directory; name the file to write")
    query = f"?version={a.version}" if a.version else ""
    data = c.call("GET", f"/v1/tasks/{_q(a.task)}/artifact{query}")
    try:
        out.write_bytes(data)
    except OSError as e:
        raise UsageError(f"{a.out}: cannot write ({e.strerror or e})") from None
    return {"task": a.task, "path": a.out, "bytes": len(data)} if a.json else f"wrote {a.out} ({len(data)} bytes)"


def train_submit(c: Client, a: argparse.Namespace) -> Any:
    text = sys.stdin.read() if a.spec == "-" else _read(Path(a.spec), "the job file").decode(errors="replace")
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise UsageError(f"{a.spec}: not JSON ({e})") from None
    out = c.json("POST", "/v1/train", spec)
    return out if a.json else f"job {out['job_id']} {out['state']}"


def train_list(c: Client, a: argparse.Namespace) -> Any:
    out = c.json("GET", f"/v1/train?offset={a.offset}&limit={a.limit}")
    if a.json:
        return out
    rows = [
        {
            "job": j["job_id"],
            "task": j["spec"].get("task"),
            "method": j["spec"].get("method"),
            "state": j["state"],
            "step": (j.get("progress") or {}).get("step"),
            "version": (j.get("result") or {}).get("version"),
            "queued": j.get("created_at"),
        }
        for j in out.get("jobs", [])
    ]
    return table(rows, ["job", "task", "method", "state", "step", "version", "queued"])


def train_status(c: Client, a: argparse.Namespace) -> Any:
    out = c.json("GET", f"/v1/train/{_q(a.job_id)}")
    if a.json:
        return out
    lines = [f"job {out['job_id']}: {out['state']}", progress_bar(out.get("progress"))]
    if out.get("result"):
        lines.append("result " + json.dumps(out["result"].get("metrics", out["result"]))[:200])
    if out.get("error"):
        lines.append("error " + out["error"])
    return "\n".join(lines)


def train_watch(c: Client, a: argparse.Namespace) -> Any:
    start = time.monotonic()
    deadline = start + a.timeout if a.timeout else None
    tty = sys.stderr.isatty()
    hinted = False
    while True:
        out = c.json("GET", f"/v1/train/{_q(a.job_id)}")
        if not a.json:
            line = f"{out['state']:<9} {progress_bar(out.get('progress'))}"
            sys.stderr.write(("\r" + line) if tty else line + "\n")
            sys.stderr.flush()
        if out["state"] in ("succeeded", "failed", "cancelled"):
            if tty and not a.json:
                sys.stderr.write("\n")
            if out["state"] == "failed":
                raise JobFailed(out.get("error") or "failed", out)
            if out["state"] == "cancelled":
                raise JobFailed(f"cancelled at {out.get('cancelled_at')}", out)
            if a.json:
                return out
            return train_status(c, argparse.Namespace(job_id=a.job_id, json=False)) + "\n" + published(out)
        queued_for = time.monotonic() - start
        if out["state"] == "queued" and out.get("workers_alive") == 0 and queued_for > QUEUED_HINT_S and not hinted:
            sys.stderr.write(("\n" if tty else "") + NO_WORKER + "\n")
            hinted = True
        if deadline is not None and time.monotonic() > deadline:
            raise JobFailed(f"still {out['state']} after {a.timeout:g}s", out)
        time.sleep(a.interval)


def published(job: dict[str, Any]) -> str:
    """The last line of a watched job that succeeded: the version it published (read from its result), or why none."""
    result = job.get("result") or {}
    task = (job.get("spec") or {}).get("task", "?")
    if result.get("published") and result.get("version") is not None:
        return f"published {task} version {result['version']}"
    reason = result.get("reason") or "see the result above"
    return reason if reason.startswith("not published") else f"not published: {reason}"


def train_cancel(c: Client, a: argparse.Namespace) -> Any:
    out = c.json("DELETE", f"/v1/train/{_q(a.job_id)}")
    return out if a.json else f"job {out['job_id']} {out['state']}"


class UsageError(Exception):
    pass


class JobFailed(Exception):
    def __init__(self, message: str, job: dict[str, Any]) -> None:
        super().__init__(message)
        self.job = job


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:  # missing, unreadable, a directory: the operator's to fix, in one line
        raise UsageError(f"{path}: cannot read {what} ({e.strerror or e})") from None


class Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line on stderr and exit status 2 (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog.split()[0]} --help)\n")


def _globals(defaults: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name. Only the top level gives them defaults: a
    sub-command's parser would otherwise reset an option given before it (SUPPRESS leaves it as it was)."""
    g = argparse.ArgumentParser(add_help=False)
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
    g.add_argument("--url", default=d(None), help=f"the server (default: PREFIXSERVE_URL, else {DEFAULT_URL})")
    g.add_argument("--key", default=d(None), help="an admin key (default: the first of PREFIXSERVE_ADMIN_KEYS)")
    g.add_argument("--json", action="store_true", default=d(False), help="machine-readable output")
    g.add_argument("--http-timeout", type=float, default=d(60.0), help="seconds per HTTP call")
    return g


def admin_key(environ: Mapping[str, str]) -> str | None:
    """The key the server reads (PREFIXSERVE_ADMIN_KEYS, comma-separated: its first), else the old variable."""
    keys = [k.strip() for k in environ.get("PREFIXSERVE_ADMIN_KEYS", "").split(",") if k.strip()]
    if keys:
        return keys[0]
    old = environ.get("PREFIXSERVE_ADMIN_KEY")
    if old:
        sys.stderr.write(
            "prefixserve: PREFIXSERVE_ADMIN_KEY is deprecated: set PREFIXSERVE_ADMIN_KEYS, as the server does\n"
        )
    return old or None


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="prefixserve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_globals(defaults=True)],
    )
    common = [_globals(defaults=False)]
    top = p.add_subparsers(dest="group", required=True, parser_class=Parser)

    def group(name: str, help_text: str) -> argparse._SubParsersAction:
        return top.add_parser(name, help=help_text, parents=common).add_subparsers(
            dest="command", required=True, parser_class=Parser
        )

    tasks = group("tasks", "list, show, upload, roll back, delete and export tasks")
    train = group("train", "submit, follow and cancel training jobs")

    def command(of: argparse._SubParsersAction, name: str, **kw: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = of.add_parser(name, parents=common, **kw)
        return parser

    command(tasks, "list").set_defaults(fn=tasks_list)
    show = command(tasks, "show")
    show.add_argument("task")
    show.set_defaults(fn=tasks_show)
    up = command(tasks, "upload", help="a PEFT directory, or a file (--kind: artifact, state_dict, vpt_checkpoint)")
    up.add_argument("task")
    up.add_argument("source")
    up.add_argument("--kind", default="artifact", choices=["artifact", "state_dict", "vpt_checkpoint"])
    up.add_argument("--labels", help="class names, a,b,c")
    up.add_argument(
        "--method", help="the method a PEFT adapter holds where its type fits several (the server names them)"
    )
    up.add_argument("--chat-template", help="a file holding the task's Jinja chat template")
    up.set_defaults(fn=tasks_upload)
    rb = command(tasks, "rollback")
    rb.add_argument("task")
    rb.add_argument("version", type=int)
    rb.set_defaults(fn=tasks_rollback)
    rm = command(tasks, "delete")
    rm.add_argument("task")
    rm.add_argument("--version", type=int)
    rm.set_defaults(fn=tasks_delete)
    ex = command(tasks, "export")
    ex.add_argument("task")
    ex.add_argument("out")
    ex.add_argument("--version", type=int)
    ex.set_defaults(fn=tasks_export)
    sub = command(train, "submit")
    sub.add_argument("spec", help="a TrainSpec JSON file, or - for stdin")
    sub.set_defaults(fn=train_submit)
    ls = command(train, "list", help="recent jobs, newest first")
    ls.add_argument("--offset", type=int, default=0)
    ls.add_argument("--limit", type=int, default=20, help="1-100")
    ls.set_defaults(fn=train_list)
    st = command(train, "status")
    st.add_argument("job_id")
    st.set_defaults(fn=train_status)
    w = command(train, "watch")
    w.add_argument("job_id")
    w.add_argument("--interval", type=float, default=1.0)
    w.add_argument("--timeout", type=float, default=0.0, help="give up after this many seconds (0: never)")
    w.set_defaults(fn=train_watch)
    cn = command(train, "cancel", help="cancel a queued or running job (a job that ended: 409)")
    cn.add_argument("job_id")
    cn.set_defaults(fn=train_cancel)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    url = a.url or os.environ.get("PREFIXSERVE_URL") or DEFAULT_URL
    if not url.startswith(("http://", "https://")):
        p.error(f"--url: expected http://host:port or https://..., got {url!r}")
    client = Client(url, a.key or admin_key(os.environ), timeout=a.http_timeout)
    try:
        out = a.fn(client, a)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    except Refused as e:
        sys.stderr.write(f"{e}\n")
        return EXIT_REFUSED
    except Unreachable as e:
        sys.stderr.write(f"{e}\n")
        return EXIT_UNREACHABLE
    except UsageError as e:
        sys.stderr.write(f"prefixserve: {e}\n")
        return EXIT_USAGE
    except JobFailed as e:
        if a.json:
            sys.stdout.write(json.dumps(e.job) + "\n")
        else:
            sys.stderr.write(f"job failed: {e}\n")
        return EXIT_JOB_FAILED
    if out is not None:
        sys.stdout.write((json.dumps(out, indent=1) if a.json else str(out)) + "\n")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
