"""The scheduler: the one owner of queue state, and the loop that feeds the engine.

Callers queue Submissions (`submit_all`, or `submit` for one request); that checks the queue bound and each
request's kind against the backbone at once (QueueFull, Unsupported past them) and returns handles. A request's task
version is resolved once: by the caller (the service resolves each call's task itself and hands the artifact over),
or from a task name through the prefix cache, by a short task per call (a Redis miss never blocks the loop). Its
EngineRequest is built then, once, checked against the context budget, and put in its task's ready queue. The loop
then runs forever:

  admit    take ready requests by priority class (a class waiting for room holds it against the classes below),
           then round-robin across tasks (a hot task cannot starve the others) and each task's clients, within the
           free rows (max_batch_size), the key/value token budget (max_batch_tokens) and the prefill budget per step;
  step     run `engine.step` on the engine's one worker thread, so the event loop stays responsive;
  deliver  append each event to its request's history; finished and cancelled rows have already left the batch.

A request keeps the exact artifact version it was admitted with until it finishes, whatever is published later.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from prefix_store import PrefixArtifact, PrefixStore

from .backbone import Backbone
from .engine import DeviceFull, Engine
from .errors import DeviceCacheFull, EngineFailure, InputTooLong, QueueFull, RequestTimeout, Unsupported
from .host_cache import HostCache
from .output import (
    ClassificationResult,
    EmbeddingResult,
    GenerationResult,
    classification_result,
    embedding_result,
    generation_result,
)
from .ready_queue import PRIORITIES, ReadyQueue
from .sampling import SamplingParams
from .step import EngineRequest, FinishReason, Kind, RowOutput, StepOutput, StepPlan, Submission

log = logging.getLogger(__name__)
_ids = itertools.count()
_calls = itertools.count()  # submit_all calls, in arrival order: the newest queued call is displaced first
T = TypeVar("T")


@dataclass
class _Request:
    """A submitted request and its scheduling state. `work`, what the engine runs, is built once, as soon as the
    request's task version is known: at submission when the caller gave it resolved (or the bare backbone), else once
    the host cache has resolved the name. Every ready, held or admitted request has it."""

    id: str
    submission: Submission  # as the caller gave it
    deadline: float | None
    task: str | None  # the ready queue's keys: the task's name ...
    client: str  # ... and who sent it (the unit of fairness within a task)
    priority: str  # its class in the ready queue (Submission.priority)
    call: int = 0  # the submit_all call it came in (all or none: a displaced call leaves the queue whole)
    work: EngineRequest | None = None
    # Outputs are appended to `history`; a streaming reader waits on `signal`, a non-streaming one only on
    # `finished`, so a request awaiting its result is not woken once per token.
    history: list[RowOutput] = field(default_factory=list)
    signal: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    held: bool = False  # its prefix is resident on the device and held for it (loaded ahead of admission)
    admitted: bool = False  # handed to the engine; its row runs there until it finishes
    cancelled: bool = False
    done: bool = False
    submitted_at: float = field(default_factory=time.monotonic)
    first_output_at: float | None = None

    @property
    def artifact(self) -> PrefixArtifact | None:
        """The task version it runs; None: the bare backbone, or a name not resolved yet."""
        return None if self.work is None else self.work.artifact

    @property
    def resolved(self) -> EngineRequest:
        """`work`, of a request past resolution (every ready, held or admitted one)."""
        assert self.work is not None, "a request is resolved before it is queued"
        return self.work


def _work(req: _Request, artifact: PrefixArtifact | None, group: str | None) -> EngineRequest:
    """The request's EngineRequest, once its task version is known (None: the bare backbone)."""
    sub = req.submission
    return EngineRequest(
        req.id, sub.kind, sub.prompt_ids, artifact, sub.params, sub.token_type_ids, sub.pixel_values, group
    )


class RequestHandle:
    """What `submit` returns: stream the events, or await the result; `cancel` frees the request's row."""

    def __init__(self, req: _Request, scheduler: Scheduler) -> None:
        self._req = req
        self._scheduler = scheduler
        self._cursor = 0

    @property
    def id(self) -> str:
        return self._req.id

    @property
    def version(self) -> int | None:
        return None if self._req.artifact is None else self._req.artifact.version

    async def events(self) -> AsyncIterator[RowOutput]:
        """Outputs until the request finishes; raises the request's error instead of yielding it."""
        req = self._req
        while True:
            while self._cursor < len(req.history):  # a later call resumes where an earlier one stopped
                out = req.history[self._cursor]
                self._cursor += 1
                if out.error is not None:
                    raise out.error
                yield out
                if out.finished:
                    return
            req.signal.clear()
            await req.signal.wait()

    async def result(self) -> GenerationResult | ClassificationResult | EmbeddingResult:
        await self._req.finished.wait()
        req, sub, art = self._req, self._req.submission, self._req.artifact
        for out in req.history:
            if out.error is not None:
                raise out.error
        if sub.kind is Kind.CLASSIFY:
            assert art is not None and art.head is not None and art.version is not None
            return classification_result(art.task, art.version, art.head.labels, req.history[-1])
        if sub.kind is Kind.EMBED:
            return embedding_result(art, len(sub.prompt_ids), req.history[-1])
        assert sub.params is not None
        return generation_result(req.task, self.version, len(sub.prompt_ids), req.history, sub.params.logprobs)

    @property
    def first_output_latency(self) -> float | None:
        """Seconds from submission to the first token (or label), once there is one."""
        req = self._req
        return None if req.first_output_at is None else req.first_output_at - req.submitted_at

    def cancel(self) -> None:
        self._scheduler.cancel(self._req)


def build_serving(
    backbone: Backbone,
    store: PrefixStore,
    *,
    device_cache_bytes: int = 1024**3,
    host_cache_bytes: int = 4 * 1024**3,
    max_batch_size: int = 32,
    max_prefill_tokens: int = 8192,
    pin_fraction: float = 0.5,
    compile: bool = False,
    **scheduler_kw: int,
) -> Scheduler:
    """Engine, host cache and scheduler, linked so that store events invalidate the device tier too.
    Nothing is started: call `scheduler.host_cache.start()` and `scheduler.start()`."""
    engine = Engine(
        backbone,
        device_cache_bytes=device_cache_bytes,
        max_rows=max_batch_size,
        max_prefill_tokens=max_prefill_tokens,
        pin_fraction=pin_fraction,
        compile=compile,
    )
    host_cache = HostCache(store, capacity_bytes=host_cache_bytes, on_invalidate=engine.invalidate)
    return Scheduler(engine, host_cache, **scheduler_kw)


class Scheduler:
    """Args:
    engine: runs the steps; its `max_rows` is the most rows running at once, and it prefills prompts in chunks of at
        most `max_prefill_tokens`.
    host_cache: resolves (task) -> artifact of its current version, through host memory and Redis.
    max_batch_tokens: most key/value columns (prefix + prompt + max new tokens) reserved by running rows.
    max_queue: most requests waiting (resolving or ready); past it, submit displaces queued requests of a lower
        priority class to make room, or raises QueueFull.
    max_step_failures: consecutive failed engine steps after which the replica gives up (`on_fatal`).

    A failed step fails the requests it held and takes the replica out of readiness (`healthy`) until a step
    succeeds. A device fault (a CUDA error: the context is poisoned, every later step would fail too) is fatal at
    once, as are `max_step_failures` failures in a row: `on_fatal(reason)` is called (the service stops its server
    then, so its supervisor restarts it) and the replica stays unready.
    """

    def __init__(
        self,
        engine: Engine,
        host_cache: HostCache,
        *,
        max_batch_tokens: int = 65536,
        max_queue: int = 1024,
        max_step_failures: int = 3,
    ) -> None:
        self.engine = engine
        self.host_cache = host_cache
        self.max_batch_size = engine.max_rows
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self.max_positions = engine.bb.max_positions
        self._ready: ReadyQueue[_Request] = ReadyQueue()  # fair over tasks, then over each task's clients
        self._waiting = 0  # submitted, not yet admitted (resolving or ready)
        self._live: dict[str, _Request] = {}  # every request submitted and not finished, by id
        self._cancel: set[str] = set()  # admitted requests to cancel at the next step
        self._last = StepOutput(step=0)  # what the engine reported after the last step: rows running, reservations
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._resolving: set[asyncio.Task[None]] = set()  # calls whose task names are being looked up (held here)
        self.cancelled = 0  # requests that ended cancelled (client gone, or explicit)
        self.on_step: Callable[[int], None] | None = None  # told the rows of each step (metrics)
        self.max_step_failures = max_step_failures
        self.step_failures = 0  # consecutive failed steps
        self.fault: str | None = None  # why the engine cannot be trusted now; None: healthy
        self.fatal: str | None = None  # why the replica gave up (sticky)
        self.on_fatal: Callable[[str], None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="scheduler")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def on_engine(self, fn: Callable[[Engine], T]) -> T:
        """Runs fn(engine) on the engine's one worker thread, between two steps (the executor runs one job at a
        time, so it never overlaps a step or a load): how anything but the loop changes engine state (pins)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, self.engine)

    @property
    def alive(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    @property
    def healthy(self) -> bool:
        """The loop runs and its last step did not fail (nor did the device fail, ever)."""
        return self.alive and self.fault is None and self.fatal is None

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._last.running

    @property
    def reserved_tokens(self) -> int:
        """Key/value columns the running rows reserve (prefix + prompt + max new tokens), as of the last step."""
        return self._last.reserved_tokens

    def task_requests(self) -> tuple[dict[str, int], dict[str, int]]:
        """Live requests per task, (waiting for admission, admitted), for the metrics: one pass over at most
        max_queue + max_batch_size requests, from any thread (the dict is copied whole, in one call, first). Only
        requests whose task version is resolved count, so every name is a stored task's; the bare backbone's
        requests are left out."""
        waiting: dict[str, int] = {}
        admitted: dict[str, int] = {}
        for req in list(self._live.values()):
            art = req.artifact
            if art is not None:
                side = admitted if req.admitted else waiting
                side[art.task] = side.get(art.task, 0) + 1
        return waiting, admitted

    # -- submission ---------------------------------------------------------------------------------------------
    def submit(
        self,
        task: str | PrefixArtifact | None,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        *,
        token_type_ids: list[int] | None = None,
        timeout_s: float | None = None,
        version: int | None = None,
        pixel_values: torch.Tensor | None = None,
        embed: bool = False,
        client: str = "",
        priority: str = "normal",
    ) -> RequestHandle:
        """Queues one generation (params given), classification (params None) or embedding (`embed`, encoders)
        request for `task` (a name, a resolved version, or None: the bare backbone; see Submission); an image
        backbone reads `pixel_values` (C, H, W) instead of prompt ids. Raises QueueFull at once when the queue is at
        its bound and holds no request of a lower class to displace (see submit_all)."""
        sub = Submission(
            list(prompt_ids),
            task,
            params,
            embed=embed,
            version=version,
            token_type_ids=token_type_ids,
            pixel_values=pixel_values,
            client=client,
            priority=priority,
        )
        self._validate([sub])
        if not self._make_room([sub]):
            raise QueueFull(f"queue full: {self._waiting} requests waiting (limit {self.max_queue}); retry later")
        return self._queue([sub], timeout_s)[0]

    def submit_all(self, submissions: Sequence[Submission], *, timeout_s: float | None = None) -> list[RequestHandle]:
        """Queues several requests all or none: the refusal of one that cannot run on this backbone (Unsupported,
        InputTooLong), or QueueFull when they do not all fit, before any is queued. A full queue first makes room by
        displacing queued requests of a strictly lower class (`_make_room`). Each task name of the call is resolved
        once, so its requests run one version; a request with `fork_of` may share its leader's prefill."""
        self._validate(submissions)
        if not self._make_room(submissions):
            raise QueueFull(
                f"queue full: {self._waiting} requests waiting, this call adds {len(submissions)} "
                f"(limit {self.max_queue}); retry later"
            )
        return self._queue(submissions, timeout_s)

    def _validate(self, submissions: Sequence[Submission]) -> None:
        """Every check a call can fail at submission, made before any queued request is displaced for it."""
        for i, sub in enumerate(submissions):
            self._refuse(sub)
            if sub.fork_of is not None and not 0 <= sub.fork_of < i:
                raise ValueError(f"request {i}: fork_of {sub.fork_of} is not an earlier request of the call")

    def _make_room(self, submissions: Sequence[Submission]) -> bool:
        """Whether the call fits the queue, after displacing what it may (False: it is refused). When it does not
        fit, ready requests of a class strictly below the call's (its lowest, should a call mix classes) leave the
        queue, the lowest class first and within it the newest call first, whole calls at a time (a call is all or
        none: its caller gets the 429 for any one of its requests, so the others would only run for nobody), until
        the call fits. Each ends with QueueFull, as if the queue had refused it at arrival (the HTTP layer answers
        429 with Retry-After and refunds its key's charge: routes.common.Call). A request of an equal or higher
        class is never displaced, nor one whose task name is still being resolved (not in the ready queue yet);
        when displacing every candidate would not make room, nothing is displaced and the call is refused."""
        need = self._waiting + len(submissions) - self.max_queue
        if need <= 0:
            return True
        rank = max(PRIORITIES.index(sub.priority) for sub in submissions)
        calls: dict[tuple[int, int], list[_Request]] = {}
        for req in self._ready:
            below = PRIORITIES.index(req.priority)
            if below > rank:
                calls.setdefault((below, req.call), []).append(req)
        victims: list[_Request] = []
        for key in sorted(calls, reverse=True):  # the lowest class first, within it the newest call first
            if len(victims) >= need:
                break
            victims += calls[key]
        if len(victims) < need:
            return False
        for req in victims:
            self._ready.remove(req)
            self._waiting -= 1
            if req.cancelled:
                self._finish(req, RowOutput(req.id, self._last.step, finish_reason=FinishReason.CANCELLED))
                continue
            waited = time.monotonic() - req.submitted_at
            error = QueueFull(
                f"queue full: a {PRIORITIES[rank]}-priority request took the place of this {req.priority}-priority "
                f"one after {waited:.1f}s waiting (limit {self.max_queue} waiting); retry later"
            )
            self._finish(req, RowOutput(req.id, self._last.step, finish_reason=FinishReason.ERROR, error=error))
        log.info("queue full: %d lower-priority requests displaced for a %s one", len(victims), PRIORITIES[rank])
        return True

    def _queue(self, submissions: Sequence[Submission], timeout_s: float | None) -> list[RequestHandle]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        call = next(_calls)
        reqs = [
            _Request(f"req-{next(_ids)}", sub, deadline, sub.task_name, sub.client, sub.priority, call)
            for sub in submissions
        ]
        self._waiting += len(reqs)
        self._live.update((req.id, req) for req in reqs)
        names: list[tuple[_Request, str, str | None]] = []  # requests whose task is a name, to resolve first
        for req in reqs:
            sub = req.submission
            group = None if sub.fork_of is None else reqs[sub.fork_of].id
            art: PrefixArtifact | None
            if isinstance(sub.task, str):
                # A version the host tier holds is resolved now, so rows submitted together queue together.
                art = self.host_cache.peek(sub.task, sub.version)
                if art is None:
                    names.append((req, sub.task, group))
                    continue
            else:
                art = sub.task
            req.work = _work(req, art, group)
            self._enqueue(req)
        if names:
            task = asyncio.create_task(self._resolve(names))
            self._resolving.add(task)
            task.add_done_callback(self._resolving.discard)
        return [RequestHandle(req, self) for req in reqs]

    def _refuse(self, sub: Submission) -> None:
        """The request's kind and input against the backbone's, whatever its task: checked once, at submission."""
        bb, kind = self.engine.bb, sub.kind
        if kind is Kind.EMBED and (sub.params is not None or not bb.is_encoder):
            raise Unsupported(
                f"embeddings are pooled encoder states: {bb.name} is a causal LM"
                if not bb.is_encoder
                else "an embedding request takes no sampling parameters"
            )
        if kind is Kind.GENERATE and bb.is_encoder:
            raise Unsupported(
                f"generation needs a causal LM backbone; {bb.name} is an encoder (it classifies and embeds)"
            )
        if bb.is_image != (sub.pixel_values is not None):
            what = "an image (pixel_values)" if bb.is_image else "text (prompt ids)"
            raise Unsupported(f"backbone {bb.name} classifies {what}")
        if not sub.prompt_ids and sub.pixel_values is None:
            raise InputTooLong("the prompt is empty: expected at least one token")

    async def _resolve(self, names: list[tuple[_Request, str, str | None]]) -> None:
        """Resolves a call's task names through the host cache (a Redis miss never blocks the loop), each (name,
        version) once, then builds and queues each request."""
        pending = list(names)  # not yet queued or finished: each leaves by one of the two, whatever happens
        try:
            keys = list(dict.fromkeys((name, req.submission.version) for req, name, _ in names))
            artifacts = await asyncio.gather(*(self.host_cache.get(*k) for k in keys), return_exceptions=True)
            found = dict(zip(keys, artifacts, strict=True))
            while pending:
                req, name, group = pending[0]
                art = found[(name, req.submission.version)]
                if isinstance(art, Exception):
                    pending.pop(0)
                    self._waiting -= 1
                    self._finish(req, RowOutput(req.id, self._last.step, finish_reason=FinishReason.ERROR, error=art))
                elif isinstance(art, BaseException):  # cancelled (the service stops): not a failure of the request
                    raise art
                else:
                    pending.pop(0)
                    req.work = _work(req, art, group)
                    self._enqueue(req)
        finally:
            for req, _, _ in pending:  # the lookup itself was cancelled: the requests end, their places free
                self._waiting -= 1
                self._finish(req, RowOutput(req.id, self._last.step, finish_reason=FinishReason.CANCELLED))

    def _enqueue(self, req: _Request) -> None:
        """A resolved request: checked against its task version and the budgets, then ready (or failed)."""
        try:
            self._check(req.resolved)
        except Exception as e:
            self._waiting -= 1
            self._finish(req, RowOutput(req.id, self._last.step, finish_reason=FinishReason.ERROR, error=e))
            return
        if req.cancelled:
            self._waiting -= 1
            self._finish(req, RowOutput(req.id, self._last.step, finish_reason=FinishReason.CANCELLED))
            return
        self._ready.push(req)
        self._wake.set()

    def _check(self, er: EngineRequest) -> None:
        art = er.artifact
        if er.kind is Kind.CLASSIFY and (art is None or art.head is None):
            what = "the bare backbone" if art is None else f"task {art.task!r} v{art.version}"
            raise Unsupported(f"{what} has no classification head: classification needs a task trained with one")
        if er.kind is Kind.CLASSIFY and art is not None and art.head is not None and art.head.verbalizer:
            mask = self.engine.bb.mask_token_id
            if mask not in er.prompt_ids:
                template = f" (its template: {art.template!r})" if art.template else ""
                raise Unsupported(
                    f"task {art.task!r} reads its label at the mask token {mask}: the input has none{template}"
                )
        new = er.params.max_new_tokens if er.params else 0
        if self.max_positions and er.reserved_tokens > self.max_positions:
            raise InputTooLong(
                f"prefix ({er.num_virtual_tokens}) + prompt ({len(er.prompt_ids)}) + max new tokens ({new}) = "
                f"{er.reserved_tokens} exceeds the context window of {self.max_positions} positions"
            )
        if er.reserved_tokens > self.max_batch_tokens:
            raise InputTooLong(
                f"request needs {er.reserved_tokens} key/value tokens; the server's batch budget is "
                f"{self.max_batch_tokens}"
            )

    def cancel(self, req: _Request) -> None:
        if req.done or req.cancelled:
            return
        req.cancelled = True
        if req.admitted:
            self._cancel.add(req.id)
            self._wake.set()

    # -- the loop -----------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._ready and not self._last.running:
                self._wake.clear()
                await self._wake.wait()
            self._expire_running()
            to_load = self._pick_loads()
            if to_load:
                try:
                    loaded = await loop.run_in_executor(self._executor, self.engine.load, [r.resolved for r in to_load])
                except Exception as e:  # loading itself failed: fail those requests, keep serving the rest
                    log.exception("prefix load failed")
                    loaded = {r.id: EngineFailure(f"prefix load failed: {type(e).__name__}: {e}") for r in to_load}
                self._after_load(to_load, loaded)
            admit = self._admit()
            plan = StepPlan(tuple(r.resolved for r in admit), frozenset(self._cancel))
            self._cancel = set()
            rows = self._last.running + len(admit)
            if self.on_step is not None and rows:
                self.on_step(rows)
            if not plan.admit and not self._last.running and not plan.cancel:
                await asyncio.sleep(0.001)  # nothing admissible yet (budget); let cancellations and finishes land
                continue
            try:
                out = await loop.run_in_executor(self._executor, self.engine.step, plan)
            except Exception as e:  # the step itself failed: fail what it held rather than wedge the loop
                log.exception("engine step failed")
                self._fail_admitted(EngineFailure(f"engine step failed: {type(e).__name__}: {e}"))
                self._step_failed(e)
                continue
            self.step_failures, self.fault = 0, None
            self._last = out
            for row in out.rows:
                req = self._live.get(row.request_id)
                if req is not None:
                    self._deliver(req, row)

    def _pick_loads(self) -> list[_Request]:
        """The ready requests to load prefixes for before this step, in the order admission takes them (class by
        class, then round-robin over tasks, one per task per turn), as many as rows are free, skipping requests
        already held. A second request of a resident task is only a hold on the same device copy. A class counts
        only the holds of its own class and those above it against the free rows: held low requests waiting for
        key/value room must not keep a high request's prefix from loading (admission takes the high one first)."""
        free = self.max_batch_size - self._last.running
        picked: list[_Request] = []
        for priority in self._ready.priorities():
            free -= sum(1 for r in self._ready.of(priority) if r.held)
            if free <= 0:
                break
            order = (
                r
                for r in self._ready.admission_order(priority)
                if not r.held and r.artifact is not None and not r.cancelled
            )
            more = list(itertools.islice(order, free))
            picked += more
            free -= len(more)
        return picked

    def _after_load(self, requests: list[_Request], results: dict[str, Exception | None]) -> None:
        for req in requests:  # every hold first: a request of this load that got room frees it once it has run
            if results.get(req.id) is None:
                req.held = True
        for req in requests:
            err = results.get(req.id)
            if err is None:
                continue
            if not isinstance(err, DeviceFull):
                self._drop_ready(req, err)
            elif self._last.running == 0 and not any(r.held for r in self._ready):
                # Nothing runs or waits loaded, so only pins hold the room (a prefix larger than the whole cache is
                # refused by the engine as InputTooLong): it comes back when a pin goes, or on another replica.
                self._drop_ready(req, DeviceCacheFull(f"{err}: the room is held by pinned tasks; retry", 5))

    def _drop_ready(self, req: _Request, error: Exception) -> None:
        if self._ready.remove(req):
            self._waiting -= 1
        self._finish(req, RowOutput(req.id, self._last.step, finish_reason=FinishReason.ERROR, error=error))

    def _admit(self) -> list[_Request]:
        """Priority class by class (high, normal, low), and within a class round-robin over tasks with ready
        requests and within a task over its clients: one request per task per turn, while rows and the key/value
        budget allow. Only requests whose prefix is held on the device are admitted (the others are loaded first,
        see _pick_loads); a task whose next request does not fit is skipped this turn. A lower class gets the rows
        and budget a higher class leaves only when that class has no ready request blocked by them: while a
        higher class's ready head waits for rows or key/value columns, lower classes admit nothing, so the
        columns running rows free go to it rather than to a stream of smaller low requests."""
        admitted: list[_Request] = []
        rows = self.max_batch_size - self._last.running
        kv_left = self.max_batch_tokens - self._last.reserved_tokens
        for priority in self._ready.priorities():
            progress = True
            while progress and rows > 0 and self._ready.has(priority):
                progress = False
                for req in self._ready.heads(priority):
                    tokens = req.resolved.reserved_tokens
                    if req.cancelled or (req.deadline is not None and time.monotonic() > req.deadline):
                        self._ready.pop(req, served=False)
                        self._waiting -= 1
                        self._finish(req, self._expired_or_cancelled(req))
                    elif (req.held or req.artifact is None) and tokens <= kv_left:
                        self._ready.pop(req, served=True)
                        self._waiting -= 1
                        req.admitted = True
                        admitted.append(req)
                        rows -= 1
                        kv_left -= tokens
                        progress = True
                    if rows == 0:
                        break
            if rows == 0 or any(
                (h.held or h.artifact is None) and not h.cancelled and h.resolved.reserved_tokens > kv_left
                for h in self._ready.heads(priority)
            ):
                break  # this class waits for room: what frees is held for it, not handed to a lower class
        return admitted

    def _expire_running(self) -> None:
        now = time.monotonic()
        for req in list(self._live.values()):
            if req.admitted and req.deadline is not None and now > req.deadline and req.id not in self._cancel:
                self._cancel.add(req.id)
                self._finish(req, self._expired_or_cancelled(req))

    def _expired_or_cancelled(self, req: _Request) -> RowOutput:
        if req.cancelled:
            return RowOutput(req.id, self._last.step, finish_reason=FinishReason.CANCELLED)
        waited = time.monotonic() - req.submitted_at
        error = RequestTimeout(f"request exceeded its deadline after {waited:.1f}s")
        return RowOutput(req.id, self._last.step, finish_reason=FinishReason.ERROR, error=error)

    def _deliver(self, req: _Request, out: RowOutput) -> None:
        if req.done:
            return
        if req.first_output_at is None:
            req.first_output_at = time.monotonic()
        if out.finished or out.error is not None:
            self._finish(req, out)
        else:
            req.history.append(out)
            req.signal.set()

    def _finish(self, req: _Request, out: RowOutput) -> None:
        if req.done:
            return
        req.done = True
        if req.held and not req.admitted and req.artifact is not None:
            self.engine.release(req.artifact, req.id)
        self.cancelled += out.finish_reason is FinishReason.CANCELLED
        self._live.pop(req.id, None)
        req.history.append(out)
        req.signal.set()
        req.finished.set()

    def _step_failed(self, error: Exception) -> None:
        self.step_failures += 1
        device = is_device_fault(error)
        self.fault = f"engine step failed{' (device fault)' if device else ''}: {type(error).__name__}: {error}"
        if self.fatal is None and (device or self.step_failures >= self.max_step_failures):
            self.fatal = self.fault if device else f"{self.step_failures} engine steps failed in a row: {self.fault}"
            log.critical("the engine cannot serve: %s", self.fatal)
            if self.on_fatal is not None:
                self.on_fatal(self.fatal)

    def _fail_admitted(self, error: Exception) -> None:
        """After a failed step: every admitted request fails (the engine's state is reset, so none of them runs)."""
        for req in [r for r in self._live.values() if r.admitted]:
            self._finish(req, RowOutput(req.id, self._last.step, finish_reason=FinishReason.ERROR, error=error))
        self.engine.reset()
        self._last = StepOutput(step=self._last.step)


_DEVICE_FAULTS = ("CUDA error", "device-side assert", "CUBLAS_STATUS", "cuDNN error", "an illegal memory access")


def is_device_fault(error: BaseException) -> bool:
    """An accelerator error after which the device context cannot be trusted (CUDA faults are sticky: every later
    kernel fails). Out-of-memory is not one: the context survives it."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return False
    accelerator = getattr(torch, "AcceleratorError", None)
    if accelerator is not None and isinstance(error, accelerator):
        return True
    return isinstance(error, RuntimeError) and any(s in str(error) for s in _DEVICE_FAULTS)
