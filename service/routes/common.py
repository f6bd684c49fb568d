"""What the inference routes share: their error table, usage and token text, and `Call`, the dependency each of them
takes for one request's way down (its task resolved once, its submission, the waiting for its outputs) and the
metrics kept on that way, so that no route sets a metric itself."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request

from prefix_store import PrefixArtifact, VersionNotFound

from .. import auth, dispatch, limits, request_ids
from ..dispatch import Input, TokenEvent
from ..images import decode_images, pixel_values
from ..metrics import confirm_task, name_task, serving_task
from ..runtime import GenerationResult, QueueFull, RequestHandle, SamplingParams
from ..schemas import BASE_TASK, ErrorBody, Usage
from ..state import Services, ServicesDep

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "bad input: context window exceeded, generation on an encoder, no classification head, ...",
        401: "missing or invalid key",
        404: "unknown task or version",
        409: "prefix incompatible with the backbone",
        422: "invalid body",
        429: "queue full, or the key's requests or tokens per minute used up (see Retry-After)",
        503: "prefix store unreachable for an uncached task",
        504: "request over its deadline",
    }.items()
}


class Call:
    """One inference request on its way down: the task its body names, resolved once (every input and choice of the
    request runs that one version); its submission; the waiting for its outputs (a client gone cancels them).

    The version: `task@N` pins N; a plain name runs the version the task's traffic split draws for the request id
    (dispatch.traffic_draw: the same X-Request-ID, the same version), else its current version. The one served is
    noted for the response's X-Prefix-Version header and the log lines (request_ids.note_served) and kept in
    `request.state.version`.

    The metrics are kept here, once for every route: the task label (named by `named`, confirmed when the task
    resolves: see metrics.name_task), the time to first token (when the first outputs are in) and the generated
    tokens (when every output is in)."""

    def __init__(self, request: Request, services: ServicesDep) -> None:
        self.request = request
        self.services = services
        self.name = ""  # the task name the body gives, a pin stripped (schemas.BASE_TASK: the bare backbone)
        self.version: int | None = None  # the version the body pins (`task@N`); None: routed by the task
        self._artifact: PrefixArtifact | None = None
        self._resolved = False
        self._timed = True  # its outputs are tokens or labels, timed to the first (embeddings are not)
        self._charged: limits.Charged | None = None  # its key's charge, refunded should the queue displace it

    def named(self, name: str) -> None:
        """The task the body names, `task` or `task@N` (a malformed pin is a 400): the request's metrics label, the
        pin stripped, once the task is known to exist. A task the request's key does not see is a 404 here, as an
        unknown task is (auth.check_task): every route that names a task names it through this."""
        auth.check_task(name)
        ref = dispatch.task_ref(name)
        name_task(self.request, ref.name)
        self.name, self.version = ref.name, ref.version

    @property
    def task(self) -> str | None:
        """The store task named (its name checked); None: the bare backbone."""
        return dispatch.task_of(self.name)

    async def artifact(self) -> PrefixArtifact | None:
        """The task version the request runs (pinned, drawn from the traffic split, or current), looked up once for
        the whole request; None: the bare backbone. Raises TaskNotFound or VersionNotFound (404), StoreUnavailable
        (503)."""
        if not self._resolved:
            task = self.task
            self._artifact = None if task is None else await self._version_of(task)
            if self._artifact is not None and self._artifact.version is not None:
                request_ids.note_served(self.request.state, self._artifact.task, self._artifact.version)
            self._resolved = True
            confirm_task(self.request)
            serving_task(self.request, BASE_TASK if self._artifact is None else self._artifact.task)
        return self._artifact

    async def check_task(self) -> None:
        """That the task exists (a 404 if not, as everywhere), for a route that needs nothing of it; a pinned version
        must exist too."""
        task = self.task
        if task is not None and self.version is not None:
            await self.artifact()
            return
        if task is not None:
            await self.services.host_cache.current_version(task)
        confirm_task(self.request)

    async def _version_of(self, task: str) -> PrefixArtifact:
        cache = self.services.host_cache
        if self.version is not None:  # pinned: that version or a 404
            return await cache.get(task, self.version)
        draw = dispatch.traffic_draw(task, request_ids.current.get() or "")
        version = await cache.choose(task, draw)  # None when the task has no split: its current version
        if version is None:
            return await cache.get(task)
        try:
            return await cache.get(task, version)
        except VersionNotFound:
            # The split known here names a version deleted since (a newer split dropped it, and this replica has not
            # heard that event yet): read the routing again, once, and run what it draws, else the current version.
            cache.forget_route(task)
            version = await cache.choose(task, draw)
            with contextlib.suppress(VersionNotFound):
                return await cache.get(task, version)
            return await cache.get(task)

    async def submit(
        self,
        inputs: list[Input],
        params: SamplingParams | None = None,
        *,
        n: int = 1,
        embed: bool = False,
        user: str | None = None,
    ) -> list[RequestHandle]:
        """Queues the inputs on the task's version (see dispatch.submit_all), all or none, charged to the key's limits
        first (limits.charged: every inference route submits through here, once per request)."""
        artifact = await self.artifact()
        self._timed = not embed
        async with limits.charged(self.request, inputs, params, n) as charged:
            handles = dispatch.submit_all(self.services, artifact, inputs, params, n=n, embed=embed, user=user)
        self._charged = charged
        return handles

    async def submit_images(self, images: list[str], *, embed: bool = False) -> list[RequestHandle]:
        """Decodes and prepares the images off the event loop (CPU work), then queues them all or none."""
        services = self.services
        await self.artifact()  # an unknown task fails before any image is decoded
        processor, limit = services.backbone.image_processor, services.settings.max_body_bytes

        def prepare() -> list[Any]:
            return pixel_values(processor, decode_images(images, max_bytes=limit))

        try:
            pixels = await services.pools.images.run(prepare)
        finally:
            services.trimmer.request()  # decoded images are freed once prepared
        return await self.submit(pixels, embed=embed)

    async def results(self, handles: list[RequestHandle]) -> list[Any]:
        """Every handle's result; the time to first token observed, the generated tokens counted."""
        try:
            results = await dispatch.results(self.request, handles)
        except QueueFull:
            await self._displaced()
            raise
        self._first_outputs(handles)
        if results and isinstance(results[0], GenerationResult):
            self._generated(sum(r.completion_tokens for r in results))
        return results

    async def stream(
        self, handles: list[RequestHandle]
    ) -> tuple[list[TokenEvent], AsyncIterator[tuple[int, TokenEvent]]]:
        """The first event of every handle, awaited before any byte is sent (a failure before the first token keeps
        its HTTP status), then the rest of them merged as (index, event) in the order they arrive. The time to first
        token is observed then; the generated tokens are counted once every stream has finished."""
        try:
            firsts, rest = await dispatch.first_events(self.request, handles)
        except QueueFull:
            await self._displaced()
            raise
        self._first_outputs(handles)
        tokens, running = 0, len(handles)

        def seen(ev: TokenEvent) -> None:
            nonlocal tokens, running
            tokens += ev.token_id is not None
            running -= ev.finish_reason is not None
            if ev.finish_reason is not None and not running:
                self._generated(tokens)

        for ev in firsts:
            seen(ev)

        async def counted() -> AsyncIterator[tuple[int, TokenEvent]]:
            async for i, ev in rest:
                seen(ev)
                yield i, ev

        return firsts, counted()

    async def _displaced(self) -> None:
        """A handle ended with QueueFull: a higher-priority request displaced it from the queue after its submission
        (a submission the queue refuses raises inside limits.charged, which refunds it). Its caller gets the 429 the
        queue would have given at arrival, so its key's charge is taken back as it would have been then."""
        if self._charged is not None:
            await self._charged.refund()

    def _first_outputs(self, handles: list[RequestHandle]) -> None:
        latency = handles[0].first_output_latency if handles else None
        if self._timed and latency is not None:
            self.services.metrics.first_output(self.request, latency)

    def _generated(self, tokens: int) -> None:
        self.services.metrics.generated.labels(self.name).inc(tokens)


CallDep = Annotated[Call, Depends()]


def usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def token_text(services: Services, token_id: int) -> str:
    tok = services.backbone.tokenizer
    return tok.decode([token_id]) if tok is not None else str(token_id)
