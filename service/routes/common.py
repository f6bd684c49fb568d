"""What the inference routes share: their error table, usage and token text, and `Call`, the dependency each of them
takes for one request's way down (its task resolved once, its submission, the waiting for its outputs) and the
metrics kept on that way, so that no route sets a metric itself."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request

from prefix_store import PrefixArtifact

from .. import dispatch
from ..dispatch import Input, TokenEvent
from ..images import decode_images, pixel_values
from ..metrics import confirm_task, name_task
from ..runtime import GenerationResult, RequestHandle, SamplingParams
from ..schemas import ErrorBody, Usage
from ..state import Services, ServicesDep

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "bad input: context window exceeded, generation on an encoder, no classification head, ...",
        401: "missing or invalid key",
        404: "unknown task or version",
        409: "prefix incompatible with the backbone",
        422: "invalid body",
        429: "queue full (see Retry-After)",
        503: "prefix store unreachable for an uncached task",
        504: "request over its deadline",
    }.items()
}


class Call:
    """One inference request on its way down: the task its body names, resolved once (every input and choice of the
    request runs that one version); its submission; the waiting for its outputs (a client gone cancels them).

    The metrics are kept here, once for every route: the task label (named by `named`, confirmed when the task
    resolves: see metrics.name_task), the time to first token (when the first outputs are in) and the generated
    tokens (when every output is in)."""

    def __init__(self, request: Request, services: ServicesDep) -> None:
        self.request = request
        self.services = services
        self.name = ""  # the task name the body gives (schemas.BASE_TASK: the bare backbone)
        self._artifact: PrefixArtifact | None = None
        self._resolved = False
        self._timed = True  # its outputs are tokens or labels, timed to the first (embeddings are not)

    def named(self, name: str) -> None:
        """The task the body names: the request's metrics label once the task is known to exist."""
        name_task(self.request, name)
        self.name = name

    @property
    def task(self) -> str | None:
        """The store task named (its name checked); None: the bare backbone."""
        return dispatch.task_of(self.name)

    async def artifact(self) -> PrefixArtifact | None:
        """The task's current version, looked up once for the whole request; None: the bare backbone. Raises
        TaskNotFound (404) or StoreUnavailable (503)."""
        if not self._resolved:
            task = self.task
            self._artifact = None if task is None else await self.services.host_cache.get(task)
            self._resolved = True
            confirm_task(self.request)
        return self._artifact

    async def check_task(self) -> None:
        """That the task exists (a 404 if not, as everywhere), for a route that needs nothing of it."""
        task = self.task
        if task is not None:
            await self.services.host_cache.current_version(task)
        confirm_task(self.request)

    async def submit(
        self,
        inputs: list[Input],
        params: SamplingParams | None = None,
        *,
        n: int = 1,
        embed: bool = False,
        user: str | None = None,
    ) -> list[RequestHandle]:
        """Queues the inputs on the task's version (see dispatch.submit_all), all or none."""
        artifact = await self.artifact()
        self._timed = not embed
        return dispatch.submit_all(self.services, artifact, inputs, params, n=n, embed=embed, user=user)

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
        results = await dispatch.results(self.request, handles)
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
        firsts, rest = await dispatch.first_events(self.request, handles)
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

    def _first_outputs(self, handles: list[RequestHandle]) -> None:
        latency = handles[0].first_output_latency if handles else None
        if self._timed and latency is not None:
            self.services.metrics.ttft.observe(latency)

    def _generated(self, tokens: int) -> None:
        self.services.metrics.generated.labels(self.name).inc(tokens)


CallDep = Annotated[Call, Depends()]


def usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def token_text(services: Services, token_id: int) -> str:
    tok = services.backbone.tokenizer
    return tok.decode([token_id]) if tok is not None else str(token_id)
