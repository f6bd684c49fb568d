"""Per-key limits (requests and tokens per minute of a stored key), charged where every inference request is
submitted (routes.common.Call.submit), in Redis, so replicas sharing a namespace share one limit
(prefix_store.tenants: a sliding window over two one-minute windows, one atomic script).

A request is charged once, when it is submitted: one request, and its tokens counted up front, so one client cannot
overrun its window with long generations whose length is only known at the end:

  generation      per prompt, its tokens + max new tokens x n (its choices share the prompt)
  classification  its prompt tokens (a text pair's both parts), one per image
  embeddings      the same

A request the queue then refuses (429 queue full) is refunded, at once when it is refused at submission, and when
a higher-priority request later displaces it from the queue (routes.common.Call refunds it as its caller gets the
429). Past a limit: 429 with Retry-After (whole seconds, from the window: when this request would pass if nothing else
were charged), naming the limit and the key. A request that alone charges more tokens than the key's
tokens_per_minute can never pass: 400. Keys from the environment, and a server without keys, have no limits.

Before any of a request's work (tokenising, a chat template, the task's version from Redis), right after its key is
resolved, `precheck` refuses a request of a key already past a limit (over its requests per minute, or at its
tokens per minute: every request charges at least one of each), with one read-only script and the same window
maths (service.guard, on the COUNTED routes). /tokenize with chat `messages` renders a template: it is charged one
request (no tokens) before it renders (`charge_request`); /tokenize with a prompt, /detokenize and /v1/models are not
counted.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from fastapi import Request

from prefix_store import StoreUnavailable
from prefix_store.tenants import Charge, KeyStore

from . import auth
from .dispatch import Input
from .http_errors import BadRequest, RateLimited
from .runtime import SamplingParams

log = logging.getLogger(__name__)

# The routes that submit inference requests (each charged in Call.submit): the ones `precheck` guards.
COUNTED = frozenset({"/v1/generate", "/v1/classify", "/v1/completions", "/v1/chat/completions", "/v1/embeddings"})


def tokens_charged(inputs: list[Input], params: SamplingParams | None, n: int) -> int:
    """The tokens a request is charged (see the module docstring)."""
    new = params.max_new_tokens * n if params is not None else 0
    return sum((1 if isinstance(x, torch.Tensor) else len(x[0])) + new for x in inputs)


@dataclass
class Charged:
    """A request's charge on its key, kept to refund it should the request be refused after its submission."""

    store: KeyStore
    name: str
    charge: Charge
    tokens: int
    refunded: bool = False

    async def refund(self) -> None:
        """Takes the charge back, once; a Redis fault leaves it standing (it only costs the key a minute's share)."""
        if self.refunded:
            return
        self.refunded = True
        try:
            await self.store.refund(self.name, self.charge, tokens=self.tokens)
        except StoreUnavailable as e:
            log.warning("could not refund key %r: %s", self.name, e)


def _refused(who: auth.Principal, charge: Charge, charges: str = "") -> RateLimited:
    assert charge.retry_after_ms is not None
    limit = who.requests_per_minute if charge.limit == "requests_per_minute" else who.tokens_per_minute
    what = "requests" if charge.limit == "requests_per_minute" else "tokens"
    retry = max(1, math.ceil(charge.retry_after_ms / 1000))
    return RateLimited(
        f"rate limit: key {who.name!r} may use {limit} {what} per minute ({charge.limit})"
        f"{charges if what == 'tokens' else ''}; retry after {retry} s",
        retry,
    )


async def precheck(keys: auth.KeyRing, who: auth.Principal) -> None:
    """RateLimited when the key is already past a limit (see the module docstring): a read, nothing counted."""
    if not who.limited or keys.store is None:
        return
    refusal = await keys.store.over_limit(
        who.name, requests_per_minute=who.requests_per_minute, tokens_per_minute=who.tokens_per_minute
    )
    if refusal is not None:
        raise _refused(who, refusal, " (all used)")


async def charge_request(request: Request) -> None:
    """Charges the request's key one request and no tokens (RateLimited past its requests per minute): for work that
    is not an inference request but costs the server like one (/tokenize rendering a chat template)."""
    who = auth.principal.get()
    keys: auth.KeyRing = request.app.state.keys
    if who.requests_per_minute is None or keys.store is None:
        return
    charge = await keys.store.charge(
        who.name, requests_per_minute=who.requests_per_minute, tokens_per_minute=None, tokens=0
    )
    if not charge.charged:
        raise _refused(who, charge)


@contextlib.asynccontextmanager
async def charged(
    request: Request, inputs: list[Input], params: SamplingParams | None, n: int
) -> AsyncIterator[Charged | None]:
    """Charges the request's key for it (RateLimited or BadRequest past a limit) around its submission, which is
    refunded should the submission fail. Yields the charge (None: the key has no limits), to refund should the
    request be refused later (displaced from the queue)."""
    who = auth.principal.get()
    keys: auth.KeyRing = request.app.state.keys
    if not who.limited or keys.store is None:
        yield None
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
        raise _refused(who, charge, f" (this request charges {tokens})")
    done = Charged(store, who.name, charge, tokens)
    try:
        yield done
    except Exception:
        await done.refund()
        raise
