"""Per-key limits (requests and tokens per minute of a stored key), charged where every inference request is
submitted (routes.common.Call.submit), in Redis, so replicas sharing a namespace share one limit
(prefix_store.tenants: a sliding window over two one-minute windows, one atomic script).

A request is charged once, when it is submitted: one request, and its tokens counted up front, so one client cannot
overrun its window with long generations whose length is only known at the end:

  generation      per prompt, its tokens + max new tokens x n (its choices share the prompt)
  classification  its prompt tokens (a text pair's both parts), one per image
  embeddings      the same

A request the queue then refuses (429 queue full) is refunded. Past a limit: 429 with Retry-After (whole seconds,
from the window: when this request would pass if nothing else were charged), naming the limit and the key. A
request that alone charges more tokens than the key's tokens_per_minute can never pass: 400. Keys from the
environment, and a server without keys, have no limits; /tokenize, /detokenize and /v1/models are not counted.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator

import torch
from fastapi import Request

from prefix_store import StoreUnavailable

from . import auth
from .dispatch import Input
from .http_errors import BadRequest, RateLimited
from .runtime import SamplingParams

log = logging.getLogger(__name__)


def tokens_charged(inputs: list[Input], params: SamplingParams | None, n: int) -> int:
    """The tokens a request is charged (see the module docstring)."""
    new = params.max_new_tokens * n if params is not None else 0
    return sum((1 if isinstance(x, torch.Tensor) else len(x[0])) + new for x in inputs)


@contextlib.asynccontextmanager
async def charged(request: Request, inputs: list[Input], params: SamplingParams | None, n: int) -> AsyncIterator[None]:
    """Charges the request's key for it (RateLimited or BadRequest past a limit) around its submission, which is
    refunded should the submission fail."""
    who = auth.principal.get()
    keys: auth.KeyRing = request.app.state.keys
    if not who.limited or keys.store is None:
        yield
        return
    store = keys.store
    tokens = tokens_charged(inputs, params, n)
    charge = await store.charge(
        who.name,
        requests_per_minute=who.requests_per_minute,
        tokens_per_minute=who.tokens_per_minute,
        tokens=tokens,
    )
    if not charge.charged:
        if charge.retry_after_ms is None:
            raise BadRequest(
                f"this request charges {tokens} tokens (prompt tokens + max new tokens x n): more than key "
                f"{who.name!r} may use in any minute (tokens_per_minute {who.tokens_per_minute}); ask for fewer tokens"
            )
        limit = who.requests_per_minute if charge.limit == "requests_per_minute" else who.tokens_per_minute
        what = "requests" if charge.limit == "requests_per_minute" else "tokens"
        retry = max(1, math.ceil(charge.retry_after_ms / 1000))
        charges = "" if what == "requests" else f" (this request charges {tokens})"
        raise RateLimited(
            f"rate limit: key {who.name!r} may use {limit} {what} per minute ({charge.limit}){charges}; "
            f"retry after {retry} s",
            retry,
        )
    try:
        yield
    except Exception:
        try:
            await store.refund(who.name, charge, tokens=tokens)
        except StoreUnavailable as e:  # the charge stands: it only costs the key a minute's share
            log.warning("could not refund key %r: %s", who.name, e)
        raise
