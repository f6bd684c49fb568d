"""What the inference routes share: task names, tokenisation, submission to the scheduler, waiting (a client that goes
away cancels its request and frees its row), the HTTP layer's stream events, and Server-Sent Events."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from fastapi import Request

from prefix_store import PrefixArtifact, validate_task_name

from . import auth, request_ids
from .http_errors import BadRequest, ClientGone, InvalidRequest, status_of
from .runtime import (
    ClassificationResult,
    EmbeddingResult,
    GenerationResult,
    InputTooLong,
    RequestHandle,
    SamplingParams,
    Submission,
    Unsupported,
)
from .runtime.grammar import check_size
from .schemas import BASE_TASK, SamplingExtras
from .state import Services

DISCONNECT_POLL_S = 0.25
T = TypeVar("T")
# One input of a call: its prompt ids and, for a sentence pair, its segment ids; or an image's pixel values (C, H, W).
Input = tuple[list[int], list[int] | None] | torch.Tensor


@dataclass(frozen=True)
class TaskRef:
    """What a request's `task` / `model` names: `name@N` pins version N of task `name`; a plain name runs the
    version the task's routing gives (its traffic split, else its current version)."""

    name: str  # the task's name as given, the pin stripped (BASE_TASK: the bare backbone)
    version: int | None  # the pinned version; None: unpinned

    @property
    def task(self) -> str | None:
        """The store task (its name checked); None for the bare backbone."""
        return None if self.name == BASE_TASK else validate_task_name(self.name)


_PIN = re.compile(r"[1-9][0-9]{0,9}")  # version numbers are positive; 10 digits bound what a client may send


def task_ref(given: str) -> TaskRef:
    """Parses `task` or `task@N` (the one place a pin is read, for every inference route). Raises BadRequest for a
    malformed pin or a pin on the bare backbone; the task name itself is checked by TaskRef.task."""
    name, at, pin = given.partition("@")
    if not at:
        return TaskRef(given, None)
    if not _PIN.fullmatch(pin):
        raise BadRequest(
            f"{given[:80]!r}: a version pin is task@N with N a positive version number (at most 10 digits), "
            f"got {pin[:20]!r} after the '@'"
        )
    if name == BASE_TASK:
        raise BadRequest(f"{given!r}: the {BASE_TASK!r} task is the bare backbone, which has no versions to pin")
    return TaskRef(name, int(pin))


def task_of(name: str) -> str | None:
    """The store task a request names, a version pin (`@N`) stripped; None for the bare backbone."""
    return task_ref(name).task


def traffic_draw(task: str, request_id: str) -> float:
    """Where a request falls in [0, 1) for the task's traffic split: a hash of (task, request id), so the same id
    (a client's X-Request-ID, kept across its retries) always runs the same version, and ids the server made up
    (uuid4) spread at random. The task is in the hash so that one id does not fall alike in every task's split."""
    digest = hashlib.blake2b(f"{task}\0{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


async def prompt_ids(services: Services, prompt: str | None, input_ids: list[int] | None) -> list[int]:
    if (prompt is None) == (input_ids is None):
        raise InvalidRequest("give exactly one of 'prompt' and 'input_ids'")
    if input_ids is not None:
        return check_ids(services, input_ids)
    ids = (await tokenize(services, prompt))["input_ids"]
    if not ids:
        raise InputTooLong("the prompt is empty after tokenisation: expected at least one token")
    return ids


def check_ids(services: Services, ids: list[int], field: str = "input_ids") -> list[int]:
    vocab = services.backbone.fingerprint.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise InvalidRequest(f"{field}: expected token ids in [0, {vocab}), got {bad[:5]}")
    if not ids and field == "input_ids":
        raise InvalidRequest("input_ids: expected at least one token")
    return ids


async def encode_pair(services: Services, text: str, pair: str | None) -> tuple[list[int], list[int] | None]:
    enc = await tokenize(services, text, pair)
    return enc["input_ids"], enc.get("token_type_ids")


async def tokenize(services: Services, text: str, pair: str | None = None) -> Any:
    """Runs the tokenizer in a worker thread: texts are bounded by the schemas, but even a bounded text must not
    hold the event loop (and every other client) while it is split."""
    tok = services.backbone.tokenizer
    if tok is None:
        raise Unsupported(f"backbone {services.backbone.name} has no tokenizer: send input_ids")
    args = (text,) if pair is None else (text, pair)
    return await services.pools.tokenize.run(tok, *args)


async def sampling(
    services: Services,
    body: SamplingExtras,
    *,
    max_new_tokens: int | None = None,
    logprobs: bool | None = None,
    top_logprobs: int | None = None,
    prompt_logprobs: bool = False,
) -> SamplingParams:
    """The one place a request's sampling fields become SamplingParams (every generation route goes through it).
    `body` is any generation request; the keyword arguments are the route's own names for the same things."""
    stop_field = getattr(body, "stop", None)
    stop = [stop_field] if isinstance(stop_field, str) else list(stop_field or [])
    if any(not s for s in stop):
        raise InvalidRequest("stop: expected non-empty strings")
    n = getattr(body, "n", 1)
    if n > services.settings.max_n:
        raise InvalidRequest(f"n: expected at most {services.settings.max_n} (PREFIXSERVE_MAX_N), got {n}")
    params = SamplingParams(
        max_new_tokens=max_new_tokens or getattr(body, "max_new_tokens", 16),
        temperature=getattr(body, "temperature", 0.0),
        top_k=body.top_k,
        top_p=getattr(body, "top_p", 1.0),
        min_p=body.min_p,
        seed=getattr(body, "seed", None),
        stop=stop,
        stop_token_ids=check_ids(services, list(body.stop_token_ids), "stop_token_ids"),
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        presence_penalty=getattr(body, "presence_penalty", 0.0),
        frequency_penalty=getattr(body, "frequency_penalty", 0.0),
        repetition_penalty=body.repetition_penalty,
        logprobs=getattr(body, "logprobs", False) if logprobs is None else logprobs,
        top_logprobs=getattr(body, "top_logprobs", 0) if top_logprobs is None else top_logprobs,
        prompt_logprobs=prompt_logprobs,
    )
    rf = body.response_format
    if rf is not None and rf.type != "text":
        if rf.type == "json_schema" and rf.json_schema is None:
            raise InvalidRequest("response_format: type json_schema needs a json_schema object")
        if params.ignore_eos or params.min_tokens:
            raise InvalidRequest(
                "response_format: does not go with ignore_eos or min_tokens (the grammar ends the output)"
            )
        grammars = services.engine.grammars  # compiling a schema is CPU work: off the event loop, in its own pool
        if rf.json_schema is not None:
            check_size(rf.json_schema.schema_)  # an oversized schema is refused before it waits for the pool
        try:
            grammar = await services.pools.grammar.run(grammars.compile, rf.model_dump(by_alias=True))
        finally:
            services.trimmer.request()  # a refused or evicted grammar's lexer is freed: give the pages back
        params = dataclasses.replace(params, grammar=grammar)
    if params.min_tokens > params.max_new_tokens:
        raise InvalidRequest(
            f"min_tokens: expected at most the output limit ({params.max_new_tokens}), got {params.min_tokens}"
        )
    return params


def choices(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The parameters of n outputs of one prompt: choice i draws with seed + i (a seed gives n different, repeatable
    outputs); without a seed each draws from fresh entropy."""
    if n == 1:
        return [params]
    return [
        dataclasses.replace(params, seed=None if params.seed is None else (params.seed + i) % 2**63) for i in range(n)
    ]


def client(user: str | None = None) -> str:
    """Who the scheduler shares a task's turns between: the caller's key (auth.client_id), or on a server without
    keys the request's `user` field (with keys, `user` cannot buy a client more turns)."""
    return auth.client.get() or (f"user:{user}" if user else "")


def submit_all(
    services: Services,
    artifact: PrefixArtifact | None,
    inputs: list[Input],
    params: SamplingParams | None = None,
    *,
    n: int = 1,
    embed: bool = False,
    user: str | None = None,
) -> list[RequestHandle]:
    """Queues one request per input on the task version `artifact` (resolved by the caller, once; None: the bare
    backbone), n per input for generation (input-major, choice i with seed + i, the other choices forks of the
    first), all or none: when the queue cannot take them all, none is queued (429)."""
    per_input = choices(params, n) if params is not None else [None]
    submissions: list[Submission] = []
    who = client(user)
    priority = auth.principal.get().priority  # the key's admission class (ready_queue)
    for x in inputs:
        ids, types, pixels = ([], None, x) if isinstance(x, torch.Tensor) else (x[0], x[1], None)
        first = len(submissions)  # the other choices of this prompt copy its prefill
        for j, p in enumerate(per_input):
            submissions.append(
                Submission(
                    ids,
                    artifact,
                    p,
                    embed=embed,
                    token_type_ids=types,
                    pixel_values=pixels,
                    client=who,
                    fork_of=first if j else None,
                    priority=priority,
                )
            )
    return services.scheduler.submit_all(submissions, timeout_s=services.settings.request_timeout_s)


@dataclass(frozen=True)
class TokenEvent:
    """One step of a streamed generation as the HTTP layer sends it (no tensors, no exceptions: a failure is raised
    by the iterator instead)."""

    token_id: int | None
    text: str
    logprob: float | None
    finish_reason: str | None
    top_logprobs: list[tuple[int, float]] | None = None
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None  # on the first event, with echo


async def _token_events(handle: RequestHandle) -> AsyncIterator[TokenEvent]:
    async for out in handle.events():
        reason = out.finish_reason.value if out.finish_reason is not None else None
        yield TokenEvent(out.token_id, out.text, out.logprob, reason, out.top_logprobs, out.prompt_logprobs)


async def first_events(
    request: Request, handles: list[RequestHandle]
) -> tuple[list[TokenEvent], AsyncIterator[tuple[int, TokenEvent]]]:
    """The first event of each of several streams (n choices), awaited before any byte is sent, then the rest of
    them merged as (index, event) in the order they arrive. Should one fail (displaced from the queue, over its
    deadline), every handle is cancelled: the caller gets that error, so the other choices would run for nobody."""
    firsts, streams = [], []
    try:
        for h in handles:
            first, events = await first_event(request, h)
            firsts.append(first)
            streams.append(events)
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return firsts, _merged(streams)


async def _merged(streams: list[AsyncIterator[TokenEvent]]) -> AsyncIterator[tuple[int, TokenEvent]]:
    if len(streams) == 1:  # one stream (n 1): read straight through, no task per event
        async for ev in streams[0]:
            yield 0, ev
        return
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in sorted(done, key=pending.__getitem__):
                i = pending.pop(fut)
                try:
                    ev = fut.result()
                except StopAsyncIteration:
                    continue
                yield i, ev
                if ev.finish_reason is None:
                    pending[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        for fut in pending:
            fut.cancel()


async def first_event(request: Request, handle: RequestHandle) -> tuple[TokenEvent, AsyncIterator[TokenEvent]]:
    """The first event of a stream, awaited before any byte is sent, so that a failure (unknown task, prefix
    incompatible, queue timeout) still gets its own HTTP status. A client gone meanwhile cancels the request."""
    events = _token_events(handle)
    first = await _unless_gone(request, handle, events.__anext__(), "before the first token")
    return first, events


async def result(request: Request, handle: RequestHandle) -> GenerationResult | ClassificationResult | EmbeddingResult:
    """Awaits the result; if the client disconnects first, cancels the request (its row frees at the next step)."""
    return await _unless_gone(request, handle, handle.result(), "before the answer was ready")


async def _unless_gone(request: Request, handle: RequestHandle, awaitable: Awaitable[T], when: str) -> T:
    """Awaits `awaitable`, checking every DISCONNECT_POLL_S that the client is still there; if it left, the
    request is cancelled and ClientGone raised."""
    waiter = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
            if done:
                return waiter.result()
            if await request.is_disconnected():
                handle.cancel()
                raise ClientGone(f"client disconnected {when}")
    finally:
        if not waiter.done():
            waiter.cancel()


async def results(request: Request, handles: list[RequestHandle]) -> list[Any]:
    try:
        return list(await asyncio.gather(*(result(request, h) for h in handles)))
    except BaseException:
        for h in handles:
            h.cancel()
        raise


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def guarded_stream(stream: AsyncIterator[str], *handles: RequestHandle) -> AsyncIterator[str]:
    """Yields a route's SSE chunks; when the client disconnects Starlette stops iterating, and the requests are
    cancelled so their rows free at the next step. Errors after the first byte become a final error event."""
    try:
        async for chunk in stream:
            yield chunk
    except Exception as e:  # the status line is already sent: report in-band
        error = {
            "message": str(e),
            "type": type(e).__name__,
            "code": status_of(e),
            "request_id": request_ids.current.get(),
        }
        yield sse({"error": error})
    finally:
        for handle in handles:
            handle.cancel()
