"""`prefixserve`: the operator's command line, over the service's HTTP API (standard library only, so it starts fast
and runs anywhere the URL is reachable).

    prefixserve tasks list
    prefixserve tasks show sst2
    prefixserve tasks upload sst2 ./peft-adapter-dir --labels neg,pos      # a PEFT directory, or an artifact file
    prefixserve tasks rollback sst2 3
    prefixserve tasks delete sst2 [--version 2]
    prefixserve tasks export sst2 sst2.safetensors [--version 2]
    prefixserve train submit job.json           # a TrainSpec as JSON (a file, or - for stdin)
    prefixserve train status JOB_ID
    prefixserve train watch JOB_ID              # a progress bar until the job ends
    prefixserve train cancel JOB_ID             # a queued job never starts; a running one stops, unpublished

URL and key: --url / --key, or PREFIXSERVE_URL (default http://127.0.0.1:8000) and PREFIXSERVE_ADMIN_KEY. Output:
readable tables, or --json for scripts. Exit codes: 0 success, 1 the server refused (its error message is printed as
it is), 2 bad usage, 3 the server could not be reached, 4 a watched job failed or was cancelled.
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
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_JOB_FAILED = 0, 1, 2, 3, 4


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
    frac = min(1.0, step / steps) if steps else 0.0
    bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
    extra = ""
    if progress and progress.get("loss") is not None:
        extra += f"  loss {progress['loss']:.4f}"
    dev = (progress or {}).get("dev") or {}
    extra += "".join(f"  {k} {v:.4f}" for k, v in dev.items() if isinstance(v, int | float))
    return f"[{bar}] {step}/{steps or '?'}{extra}"


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
    if a.chat_template:
        fields["chat_template"] = Path(a.chat_template).read_text()
    if src.is_dir():
        config, weights = src / "adapter_config.json", src / "adapter_model.safetensors"
        if not config.is_file() or not weights.is_file():
            raise UsageError(f"{src}: a PEFT directory holds adapter_config.json and adapter_model.safetensors")
        files = {
            "adapter_config": ("adapter_config.json", config.read_bytes()),
            "adapter_model": ("adapter_model.safetensors", weights.read_bytes()),
        }
    elif src.is_file():
        files = {a.kind: (src.name, src.read_bytes())}
    else:
        raise UsageError(f"{src}: no such file or directory")
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
    query = f"?version={a.version}" if a.version else ""
    data = c.call("GET", f"/v1/tasks/{_q(a.task)}/artifact{query}")
    Path(a.out).write_bytes(data)
    return {"task": a.task, "path": a.out, "bytes": len(data)} if a.json else f"wrote {a.out} ({len(data)} bytes)"


def train_submit(c: Client, a: argparse.Namespace) -> Any:
    text = sys.stdin.read() if a.spec == "-" else Path(a.spec).read_text()
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise UsageError(f"{a.spec}: not JSON ({e})") from None
    out = c.json("POST", "/v1/train", spec)
    return out if a.json else f"job {out['job_id']} {out['state']}"


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
    deadline = time.monotonic() + a.timeout if a.timeout else None
    tty = sys.stderr.isatty()
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
            return out if a.json else train_status(c, argparse.Namespace(job_id=a.job_id, json=False))
        if deadline is not None and time.monotonic() > deadline:
            raise JobFailed(f"still {out['state']} after {a.timeout:g}s", out)
        time.sleep(a.interval)


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prefixserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", default=os.environ.get("PREFIXSERVE_URL", "http://127.0.0.1:8000"))
    p.add_argument("--key", default=os.environ.get("PREFIXSERVE_ADMIN_KEY"), help="an admin key")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--http-timeout", type=float, default=60.0, help="seconds per HTTP call")
    top = p.add_subparsers(dest="group", required=True)
    tasks = top.add_parser("tasks").add_subparsers(dest="command", required=True)
    tasks.add_parser("list").set_defaults(fn=tasks_list)
    show = tasks.add_parser("show")
    show.add_argument("task")
    show.set_defaults(fn=tasks_show)
    up = tasks.add_parser("upload", help="a PEFT directory, or a file (--kind: artifact, state_dict, vpt_checkpoint)")
    up.add_argument("task")
    up.add_argument("source")
    up.add_argument("--kind", default="artifact", choices=["artifact", "state_dict", "vpt_checkpoint"])
    up.add_argument("--labels", help="class names, a,b,c")
    up.add_argument(
        "--method", help="the method a PEFT adapter holds where its type fits several (the server names them)"
    )
    up.add_argument("--chat-template", help="a file holding the task's Jinja chat template")
    up.set_defaults(fn=tasks_upload)
    rb = tasks.add_parser("rollback")
    rb.add_argument("task")
    rb.add_argument("version", type=int)
    rb.set_defaults(fn=tasks_rollback)
    rm = tasks.add_parser("delete")
    rm.add_argument("task")
    rm.add_argument("--version", type=int)
    rm.set_defaults(fn=tasks_delete)
    ex = tasks.add_parser("export")
    ex.add_argument("task")
    ex.add_argument("out")
    ex.add_argument("--version", type=int)
    ex.set_defaults(fn=tasks_export)
    train = top.add_parser("train").add_subparsers(dest="command", required=True)
    sub = train.add_parser("submit")
    sub.add_argument("spec", help="a TrainSpec JSON file, or - for stdin")
    sub.set_defaults(fn=train_submit)
    st = train.add_parser("status")
    st.add_argument("job_id")
    st.set_defaults(fn=train_status)
    w = train.add_parser("watch")
    w.add_argument("job_id")
    w.add_argument("--interval", type=float, default=1.0)
    w.add_argument("--timeout", type=float, default=0.0, help="give up after this many seconds (0: never)")
    w.set_defaults(fn=train_watch)
    cn = train.add_parser("cancel", help="cancel a queued or running job (a job that ended: 409)")
    cn.add_argument("job_id")
    cn.set_defaults(fn=train_cancel)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    client = Client(a.url, a.key, timeout=a.http_timeout)
    try:
        out = a.fn(client, a)
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
