"""POST /v1/generate and POST /v1/classify."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from prefix_store import render_template

from .. import dispatch
from ..auth import InferenceAuth
from ..dispatch import Input, TokenEvent
from ..http_errors import BadRequest, InvalidRequest
from ..runtime import GenerationResult, RequestHandle, Unsupported
from ..schemas import (
    BASE_TASK,
    Classification,
    ClassifyRequest,
    ClassifyResponse,
    GeneratedText,
    GenerateRequest,
    GenerateResponse,
    TopLogprob,
)
from ..state import Services, ServicesDep
from .common import ERRORS, CallDep, token_text, usage

router = APIRouter(prefix="/v1", tags=["inference"], dependencies=[InferenceAuth])

STREAM_DOC: dict[int | str, dict[str, Any]] = {
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
async def generate(body: GenerateRequest, call: CallDep, services: ServicesDep) -> GenerateResponse | StreamingResponse:
    call.named(body.task)
    ids = await dispatch.prompt_ids(services, body.prompt, body.input_ids)
    params = await dispatch.sampling(services, body)
    if body.stream and body.n > 1:
        raise InvalidRequest(
            f"stream: /v1/generate streams one output (n 1), got n {body.n}; the OpenAI routes stream n"
        )
    handles = await call.submit([(ids, None)], params, n=body.n)
    if body.stream:
        (first,), events = await call.stream(handles)
        stream = _generate_stream(services, body.task, handles[0], len(ids), first, events)
        return StreamingResponse(dispatch.guarded_stream(stream, handles[0]), media_type="text/event-stream")
    results: list[GenerationResult] = await call.results(handles)
    completion = sum(r.completion_tokens for r in results)
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


async def _generate_stream(
    services: Services,
    task: str,
    handle: RequestHandle,
    prompt_tokens: int,
    first: TokenEvent,
    events: AsyncIterator[tuple[int, TokenEvent]],
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
            yield dispatch.sse(
                {
                    "finish_reason": ev.finish_reason,
                    "usage": usage(prompt_tokens, n).model_dump(),
                    "task": task,
                    "version": handle.version,
                }
            )
            return
        _, ev = await anext(events)


@router.post("/classify", response_model=ClassifyResponse, responses=ERRORS, summary="Classify with a task's head")
async def classify(body: ClassifyRequest, call: CallDep, services: ServicesDep) -> ClassifyResponse:
    call.named(body.task)
    if call.task is None:
        raise Unsupported(f"the {BASE_TASK!r} task has no classification head")
    given = [name for name in ("text", "texts", "input_ids", "images") if getattr(body, name) is not None]
    if len(given) != 1:
        raise InvalidRequest(f"give exactly one of 'text', 'texts', 'input_ids' and 'images', got {given or 'none'}")
    if services.backbone.is_image != (body.images is not None):
        what = "'images'" if services.backbone.is_image else "text ('text', 'texts' or 'input_ids')"
        raise BadRequest(f"backbone {services.backbone.name} classifies {what}, got {given[0]!r}")
    if body.text_pair is not None and body.text is None:
        raise InvalidRequest("'text_pair' goes with 'text'")
    artifact = await call.artifact()  # its template reads every input, and every input runs this version
    assert artifact is not None and artifact.version is not None
    if body.images is not None:
        handles = await call.submit_images(body.images)
    else:
        if body.input_ids is not None:
            inputs: list[Input] = [(dispatch.check_ids(services, body.input_ids), None)]
        else:
            texts = [body.text] if body.text is not None else body.texts
            assert texts is not None, "exactly one of the inputs was given (checked above)"
            inputs = [
                await dispatch.encode_pair(services, *render_template(artifact.template, t, body.text_pair))
                for t in texts
            ]
        handles = await call.submit(inputs)
    results = await call.results(handles)
    return ClassifyResponse(
        task=body.task,
        version=artifact.version,
        results=[Classification(label=r.label, scores=r.scores) for r in results],
    )
