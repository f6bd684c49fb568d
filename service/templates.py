"""Chat templates, rendered where a bad one cannot hurt the replica: in a child process of their own, one render at a
time, under a CPU-time budget (past it the child is killed and replaced) and a memory budget (a watchdog in the child
exits it when its resident memory grows past the budget during a render). A template is code an uploader wrote: a
loop of range(100000) inside another, `'x' * 10**7` or a huge power can hold a CPU or memory for as long as it likes,
and only a process can be stopped from outside. The Jinja sandbox (transformers' ImmutableSandboxedEnvironment)
still applies inside the child.

A render is transformers' own `apply_chat_template(..., tokenize=True)` with the backbone's tokenizer (pickled into
the child once), so the token ids are exactly what it gives in-process.

Failures say whose they are:
- TemplateRefused (400): the template refused the caller's messages on purpose (`raise_exception("...")`, e.g.
  "roles must alternate"), with its message;
- TemplateFailed (500): the template itself is broken (an undefined name, a sandbox violation, a type error) or
  exceeded its budget: a misconfiguration of the task (or of the backbone), named as such, not the caller's fault.
An upload is refused (400) when its template cannot render a canonical two-message conversation within budget.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import os
import threading
import time
from typing import Any

from .http_errors import ServerMisconfigured, TemplateRefused
from .runtime.errors import QueueFull

log = logging.getLogger(__name__)

QUARANTINE_S = 60.0  # how long a template that overran its budget is refused without rendering
# The budget is the child's CPU time: a render starved of CPU by a busy host (the engine's threads, other replicas) is
# not the template's fault. Wall-clock still bounds it, at this multiple of the budget, so a template that sleeps or a
# host that never frees a core cannot hold a render for ever.
WALL_FACTOR = 4.0
CANONICAL = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi! How can I help?"}]
_MEMORY_EXIT = 71  # the child's exit status when its watchdog stopped a render past the memory budget


class TemplateFailed(ServerMisconfigured):
    """A chat template that is broken or exceeded its budget (500: the template's owner must fix it)."""


class TemplateRenderer:
    """Args:
    tokenizer: the backbone's tokenizer (picklable: Hugging Face fast tokenizers are).
    budget_s: the most CPU time one render may use (the child is killed past it, or past WALL_FACTOR times it of
        wall-clock).
    memory_bytes: how much a render may grow the child's resident memory.
    queue: renders waiting at most beyond the one running (past it, 429).
    """

    def __init__(self, tokenizer: Any, *, budget_s: float = 5.0, memory_bytes: int = 256 * 1024**2, queue: int = 8):
        self.tokenizer = tokenizer
        self.budget_s, self.memory_bytes, self.queue = budget_s, memory_bytes, queue
        self._proc: Any = None
        self._conn: Any = None
        self._lock = asyncio.Lock()
        self._waiting = 0
        self.killed = 0  # children stopped for exceeding a budget (tests and logs)
        # Templates that overran or crashed their renderer lately (digest -> until when, and why): refused at once
        # for QUARANTINE_S, so one bad template cannot keep a core busy restarting renderers.
        self._quarantine: dict[str, tuple[float, str]] = {}

    # -- the child's lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the child (the first one about two seconds: the fork server imports transformers)."""
        if self._proc is not None and self._proc.is_alive():
            return
        # Never fork the server itself (threads, a model): a fork server, started once with transformers and Jinja
        # imported, forks each renderer, so replacing one that overran costs milliseconds, not an interpreter start.
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["transformers", "jinja2", "tokenizers"])
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_child_main, args=(child, self.tokenizer, self.memory_bytes), name="chat-templates", daemon=True
        )
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(5)
            self._conn.close()
            self._proc = self._conn = None

    # -- renders --------------------------------------------------------------------------------------------------
    async def render(self, template: str, messages: list[dict[str, str]], *, owner: str, generation: bool = True):
        """The token ids of `messages` under `template` (add_generation_prompt=`generation`). `owner` names whose
        template it is in errors ("task 'x'", "the backbone")."""
        if self._waiting >= self.queue + 1:
            raise QueueFull(f"the server is busy rendering chat templates: {self._waiting} renders running or waiting")
        self._waiting += 1
        try:
            async with self._lock:
                return await self._render_one(template, messages, owner, generation)
        finally:
            self._waiting -= 1

    async def check(self, template: str) -> None:
        """Refuses (TemplateRefused, 400) a template that cannot render a user + assistant conversation within its
        budget: what an upload runs before the template is stored."""
        try:
            await self.render(template, CANONICAL, owner="this upload", generation=False)
        except (TemplateFailed, TemplateRefused) as e:
            raise TemplateRefused(f"chat_template: cannot render a user + assistant conversation: {e}") from None

    async def _render_one(self, template: str, messages: list[dict[str, str]], owner: str, generation: bool) -> Any:
        digest = hashlib.sha256(template.encode()).hexdigest()
        until, why = self._quarantine.get(digest, (0.0, ""))
        if time.monotonic() < until:
            raise TemplateFailed(f"the chat template of {owner} is refused for {until - time.monotonic():.0f}s: {why}")
        try:
            return await self._render_in_child(template, messages, owner, generation)
        except TemplateFailed as e:
            if self._proc is None:  # the renderer was stopped: the template overran or crashed it
                self._quarantine[digest] = (time.monotonic() + QUARANTINE_S, str(e))
                while len(self._quarantine) > 1024:
                    self._quarantine.pop(next(iter(self._quarantine)))
            raise

    async def _render_in_child(
        self, template: str, messages: list[dict[str, str]], owner: str, generation: bool
    ) -> Any:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        if self._proc is None or not self._proc.is_alive():
            await loop.run_in_executor(None, self.start)
            self._conn.send(("ping",))  # the first render waits for the child's imports, not counted in the budget
            await self._reply(loop, 120.0)
        conn = self._conn
        cpu_start = _cpu_seconds(self._proc.pid)
        conn.send(("render", template, messages, generation))
        try:
            status, value = await self._reply_within_budget(loop, cpu_start)
        except TimeoutError:
            self._replace()
            raise TemplateFailed(
                f"the chat template of {owner} did not render within its budget of {self.budget_s:g}s of CPU (stopped)"
            ) from None
        except EOFError:  # the child died: its watchdog (memory) or a crash
            code = self._proc.exitcode if self._proc is not None else None
            self._replace()
            if code == _MEMORY_EXIT:
                raise TemplateFailed(
                    f"the chat template of {owner} grew past its memory budget of {self.memory_bytes >> 20} MiB "
                    "(stopped)"
                ) from None
            raise TemplateFailed(f"the chat template of {owner} crashed its renderer (exit status {code})") from None
        log.debug("chat template rendered in %.3fs", time.monotonic() - started)
        if status == "refused":
            raise TemplateRefused(f"the chat template of {owner} refused these messages: {value}")
        if status == "error":
            raise TemplateFailed(f"the chat template of {owner} failed: {value}")
        return value

    async def _reply_within_budget(self, loop: asyncio.AbstractEventLoop, cpu_start: float | None) -> Any:
        """The render's reply, once the child has spent at most `budget_s` of CPU on it (TimeoutError past that, or
        past WALL_FACTOR x budget_s of wall-clock). Without a CPU clock for the child (not Linux) the budget is
        wall-clock."""
        wall_end = time.monotonic() + self.budget_s * WALL_FACTOR
        wait = self.budget_s
        while True:
            try:
                return await self._reply(loop, wait)
            except TimeoutError:
                used = _cpu_seconds(self._proc.pid) if self._proc is not None else None
                if cpu_start is None or used is None:
                    raise
                left_cpu, left_wall = self.budget_s - (used - cpu_start), wall_end - time.monotonic()
                if left_cpu <= 0.01 or left_wall <= 0:
                    raise
                wait = min(left_cpu, left_wall)  # starved, not spinning: wait for the CPU time it has left

    async def _reply(self, loop: asyncio.AbstractEventLoop, timeout: float) -> Any:
        """The child's next message, read when its pipe is readable (no thread waits on it)."""
        conn = self._conn
        ready = loop.create_future()
        loop.add_reader(conn.fileno(), lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, timeout)
        finally:
            loop.remove_reader(conn.fileno())
        return conn.recv()

    def _replace(self) -> None:
        """Stops a child that overran or died; the next render starts a fresh one."""
        self.killed += 1
        self.stop()


# -- the child process -----------------------------------------------------------------------------------------------
def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds process `pid` has used (Linux /proc), or None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)
    except (OSError, ValueError, IndexError, TypeError):
        return None


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cap_address_space(memory_bytes: int) -> None:
    """A second line behind the watchdog, which cannot run while one C call holds the interpreter (`'x' * n`):
    the child's address space may grow by the budget (and some slack) from here, so one huge allocation fails with
    MemoryError instead of taking the machine's memory."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = size + memory_bytes + 256 * 1024**2
        if hard == resource.RLIM_INFINITY or cap < hard:
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ImportError, OSError, ValueError):  # not Linux: the watchdog and the time budget remain
        pass


def _child_main(conn: Any, tokenizer: Any, memory_bytes: int) -> None:
    """Renders what the parent sends, one at a time, until the pipe closes."""
    from jinja2.exceptions import TemplateError

    state = {"limit": None}

    def watchdog() -> None:  # exits the process when a render grows it past the budget
        while True:
            limit = state["limit"]
            if limit is not None and _rss() > limit:
                os._exit(_MEMORY_EXIT)
            time.sleep(0.005)

    if os.path.exists("/proc/self/statm"):
        threading.Thread(target=watchdog, daemon=True).start()
    # Lazy imports (the chat-template machinery, Jinja's compiler) and the tokenizer's pools first, so the first
    # render's budget is the template's own; then the address-space cap below.
    tokenizer.apply_chat_template(
        [{"role": "user", "content": "warm up"}], chat_template="{{ messages[0]['content'] }}"
    )
    _cap_address_space(memory_bytes)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job[0] == "ping":
            conn.send(("ok", None))
            continue
        _, template, messages, generation = job
        state["limit"] = _rss() + memory_bytes if os.path.exists("/proc/self/statm") else None
        try:
            out = tokenizer.apply_chat_template(
                messages, chat_template=template, add_generation_prompt=generation, tokenize=True
            )
            ids = out["input_ids"] if hasattr(out, "keys") else out
            reply = ("ok", [int(i) for i in ids])
        except TemplateError as e:  # raise_exception() raises the base class: the template refusing on purpose
            kind = "refused" if type(e) is TemplateError else "error"
            reply = (kind, f"{type(e).__name__}: {e}" if kind == "error" else str(e))
        except MemoryError:  # the address-space cap: one allocation asked for more than the budget at once
            reply = ("error", f"MemoryError: it asked for more than its memory budget of {memory_bytes >> 20} MiB")
        except Exception as e:  # noqa: BLE001 - anything else is the template's fault too, reported as such
            reply = ("error", f"{type(e).__name__}: {str(e)[:500]}")
        state["limit"] = None
        conn.send(reply)
