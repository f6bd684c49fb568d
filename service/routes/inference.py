"""POST /v1/generate and POST /v1/classify."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from prefix_store import render_template

from .. import dispatch
from ..auth import InferenceAuth
from ..dispatch import TokenEvent
from ..http_errors import BadRequest, InvalidRequest
from ..images import decode_images, pixel_values
from ..metrics import confirm_task, name_task
from ..runtime import GenerationResult, RequestHandle, Unsupported
from ..schemas import (
    BASE_TASK,
    Classification,
    ClassifyRequest,
    ClassifyResponse,
    ErrorBody,
    GeneratedText,
    GenerateRequest,
    GenerateResponse,
    TopLogprob,
    Usage,
)
from ..state import Services, ServicesDep

ERRORS = {
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
router = APIRouter(prefix="/v1", tags=["inference"], dependencies=[InferenceAuth])

STREAM_DOC = {
    200: {
        "description": "JSON, or with `stream: true` Server-Sent Events: `data: {token_id, text, logprob}` per token, "
        "then `data: {finish_reason, usage, task, version}`",
        "content": {"text/event-stream": {"example": 'data: {"token_id":383,"text":" The","logprob":null}\n\n'}},
    }
}


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses=ERRORS | STREAM_DOC,
    summary="Generate text with a task's prefix",
)
async def generate(
    body: GenerateRequest, request: Request, services: ServicesDep
) -> GenerateResponse | StreamingResponse:
    name_task(request, body.task)
    ids = await dispatch.prompt_ids(services, body.prompt, body.input_ids)
    params = await dispatch.sampling(services, body)
    if body.stream and body.n > 1:
        raise InvalidRequest(
            f"stream: /v1/generate streams one output (n 1), got n {body.n}; the OpenAI routes stream n"
        )
    handles = dispatch.submit_all(services, dispatch.task_of(body.task), [(ids, None)], params, n=body.n)
    if body.stream:
        first, events = await dispatch.first_event(request, handles[0])
        confirm_task(request)
        services.metrics.ttft.observe(first_latency(handles[0]))
        stream = _generate_stream(services, body.task, handles[0], len(ids), first, events)
        return StreamingResponse(dispatch.guarded_stream(stream, handles[0]), media_type="text/event-stream")
    results: list[GenerationResult] = await dispatch.results(request, handles)
    confirm_task(request)
    services.metrics.ttft.observe(first_latency(handles[0]))
    completion = sum(r.completion_tokens for r in results)
    services.metrics.generated.labels(body.task).inc(completion)
    outputs = [generated_text(services, r) for r in results]
    return GenerateResponse(
        task=body.task,
        version=results[0].version,
        **outputs[0].model_dump(),
        choices=outputs if body.n > 1 else None,
        usage=usage(results[0].prompt_tokens, completion),
    )


def generated_text(services: Services, r: GenerationResult) -> GeneratedText:
    tops = None
    if r.top_logprobs is not None:
        tops = [
            [TopLogprob(token_id=i, token=token_text(services, i), logprob=v) for i, v in t] for t in r.top_logprobs
        ]
    return GeneratedText(
        text=r.text, token_ids=r.token_ids, finish_reason=r.finish_reason, logprobs=r.logprobs, top_logprobs=tops
    )


def token_text(services: Services, token_id: int) -> str:
    tok = services.backbone.tokenizer
    return tok.decode([token_id]) if tok is not None else str(token_id)


async def _generate_stream(
    services: Services,
    task: str,
    handle: RequestHandle,
    prompt_tokens: int,
    first: TokenEvent,
    events: AsyncIterator[TokenEvent],
) -> AsyncIterator[str]:
    n, ev = 0, first
    while True:
        if ev.token_id is not None:
            n += 1
            event = {"token_id": ev.token_id, "text": ev.text, "logprob": ev.logprob}
            if ev.top_logprobs is not None:
                event["top_logprobs"] = [
                    {"token_id": i, "token": token_text(services, i), "logprob": v} for i, v in ev.top_logprobs
                ]
            yield dispatch.sse(event)
        if ev.finish_reason is not None:
            services.metrics.generated.labels(task).inc(n)
            yield dispatch.sse(
                {
                    "finish_reason": ev.finish_reason,
                    "usage": usage(prompt_tokens, n).model_dump(),
                    "task": task,
                    "version": handle.version,
                }
            )
            return
        ev = await events.__anext__()


@router.post("/classify", response_model=ClassifyResponse, responses=ERRORS, summary="Classify with a task's head")
async def classify(body: ClassifyRequest, request: Request, services: ServicesDep) -> ClassifyResponse:
    name_task(request, body.task)
    task = dispatch.task_of(body.task)
    if task is None:
        raise Unsupported(f"the {BASE_TASK!r} task has no classification head")
    given = [name for name in ("text", "texts", "input_ids", "images") if getattr(body, name) is not None]
    if len(given) != 1:
        raise InvalidRequest(f"give exactly one of 'text', 'texts', 'input_ids' and 'images', got {given or 'none'}")
    if services.backbone.is_image != (body.images is not None):
        what = "'images'" if services.backbone.is_image else "text ('text', 'texts' or 'input_ids')"
        raise BadRequest(f"backbone {services.backbone.name} classifies {what}, got {given[0]!r}")
    if body.text_pair is not None and body.text is None:
        raise InvalidRequest("'text_pair' goes with 'text'")
    version = await services.host_cache.current_version(task)  # one version for every input of the call
    confirm_task(request)
    if body.images is not None:
        handles = await submit_images(body.images, services, task, version)
    else:
        template = (await services.host_cache.get(task, version)).template  # the task decides how its input reads
        if body.input_ids is not None:
            inputs = [(dispatch.check_ids(services, body.input_ids), None)]
        else:
            texts = [body.text] if body.text is not None else body.texts
            inputs = [
                await dispatch.encode_pair(services, *render_template(template, t, body.text_pair))
                for t in texts  # type: ignore[union-attr]
            ]
        handles = dispatch.submit_all(services, task, inputs, version=version)
    results = await dispatch.results(request, handles)
    services.metrics.ttft.observe(first_latency(handles[0]))
    return ClassifyResponse(
        task=body.task, version=version, results=[Classification(label=r.label, scores=r.scores) for r in results]
    )


async def submit_images(
    images: list[str], services: Services, task: str | None, version: int | None, *, embed: bool = False
) -> list[RequestHandle]:
    """Decodes and prepares the images off the event loop (CPU work), then queues them all or none."""
    processor = services.backbone.image_processor
    limit = services.settings.max_body_bytes

    def prepare() -> list:
        return pixel_values(processor, decode_images(images, max_bytes=limit))

    try:
        pixels = await services.pools.images.run(prepare)
    finally:
        services.trimmer.request()  # decoded images are freed once prepared
    client = dispatch.client()
    return services.scheduler.submit_all(
        [dict(task=task, prompt_ids=[], version=version, pixel_values=p, embed=embed, client=client) for p in pixels],
        timeout_s=services.settings.request_timeout_s,
    )


def usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def first_latency(handle: RequestHandle) -> float:
    return handle.first_output_latency or 0.0
