"""OpenAI-compatible POST /v1/completions, POST /v1/embeddings and GET /v1/models: the `model` field names the
task."""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .. import dispatch
from ..auth import InferenceAuth
from ..dispatch import TokenEvent
from ..http_errors import InvalidRequest
from ..images import MAX_IMAGES
from ..metrics import confirm_task, name_task
from ..runtime import EmbeddingResult, GenerationResult, RequestHandle, Unsupported
from ..schemas import (
    BASE_TASK,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ModelCard,
    ModelList,
    SamplingFields,
)
from ..state import Services, ServicesDep
from .inference import ERRORS, first_latency, submit_images, usage

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], dependencies=[InferenceAuth])


@router.get("/models", response_model=ModelList, responses=ERRORS, summary="Tasks, listed as OpenAI models")
async def models(services: ServicesDep) -> ModelList:
    now = int(time.time())
    cards = [
        ModelCard(id=t.name, created=_epoch(t.summary.get("created_at"), now))
        for t in await services.store.list_tasks()
    ]
    cards.insert(0, ModelCard(id=BASE_TASK, created=now))  # generates on causal LMs, embeds on encoders
    return ModelList(data=cards)


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses=ERRORS,
    summary="OpenAI-compatible text completion (`model` = task)",
)
async def completions(
    body: CompletionRequest, request: Request, services: ServicesDep
) -> CompletionResponse | StreamingResponse:
    name_task(request, body.model)
    if body.echo:
        raise InvalidRequest("echo is not supported")
    task = dispatch.task_of(body.model)
    prompts = await _prompts(services, body.prompt)
    fields = SamplingFields(temperature=body.temperature, top_p=body.top_p, stop=body.stop, seed=body.seed)
    params = dispatch.sampling(services, fields, max_new_tokens=body.max_tokens, logprobs=body.logprobs is not None)
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    if body.stream:
        if len(prompts) != 1:
            raise InvalidRequest(f"streaming takes one prompt, got {len(prompts)}")
        handle = dispatch.submit(services, task, prompts[0], params)
        first, events = await dispatch.first_event(request, handle)
        confirm_task(request)
        services.metrics.ttft.observe(first_latency(handle))
        stream = _stream(services, body, handle, meta, first, events, len(prompts[0]))
        return StreamingResponse(dispatch.guarded_stream(stream, handle), media_type="text/event-stream")
    handles = dispatch.submit_all(services, task, [(ids, None) for ids in prompts], params)
    results: list[GenerationResult] = await dispatch.results(request, handles)
    confirm_task(request)
    services.metrics.ttft.observe(first_latency(handles[0]))
    choices = [
        CompletionChoice(
            text=r.text,
            index=i,
            finish_reason=r.finish_reason,
            logprobs=_logprobs(services, r.token_ids, r.logprobs) if body.logprobs is not None else None,
        )
        for i, r in enumerate(results)
    ]
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(r.completion_tokens for r in results)
    services.metrics.generated.labels(body.model).inc(completion_tokens)
    return CompletionResponse(**meta, choices=choices, usage=usage(prompt_tokens, completion_tokens))


@router.post(
    "/embeddings",
    response_model=EmbeddingResponse,
    responses=ERRORS,
    summary="OpenAI-compatible embeddings (`model` = task): the pooled encoder state, unit length",
)
async def embeddings(body: EmbeddingRequest, request: Request, services: ServicesDep) -> EmbeddingResponse:
    """Each input's pooled state as the backbone pools it (all-MiniLM-L6-v2: the mean of its tokens; a ViT: [CLS]
    after the final LayerNorm), L2-normalised, through the task's prefix (any method) or through the bare backbone
    (`model` = "base"). Rows of every task share the batch with classification rows. Inputs are embedded as given
    (a task's classification template is not applied)."""
    name_task(request, body.model)
    bb = services.backbone
    if not bb.is_encoder:
        raise Unsupported(f"embeddings are pooled encoder states: backbone {bb.name} is a causal LM")
    if body.dimensions is not None and body.dimensions != bb.fingerprint.hidden_size:
        raise InvalidRequest(
            f"dimensions: this backbone embeds in {bb.fingerprint.hidden_size} dimensions (no truncation), "
            f"got {body.dimensions}"
        )
    task = dispatch.task_of(body.model)
    version = None if task is None else await services.host_cache.current_version(task)
    if bb.is_image:
        images = [body.input] if isinstance(body.input, str) else body.input
        if not all(isinstance(x, str) for x in images) or len(images) > MAX_IMAGES:
            raise InvalidRequest(
                f"input: backbone {bb.name} embeds images: expected up to {MAX_IMAGES} base64 images or data URLs"
            )
        handles = await submit_images(images, services, task, version, embed=True)  # type: ignore[arg-type]
    else:
        prompts = await _prompts(services, body.input, "input")
        handles = services.scheduler.submit_all(
            [dict(task=task, prompt_ids=ids, version=version, embed=True) for ids in prompts],
            timeout_s=services.settings.request_timeout_s,
        )
    confirm_task(request)
    results: list[EmbeddingResult] = await dispatch.results(request, handles)
    data = [
        EmbeddingData(index=i, embedding=_b64(r.embedding) if body.encoding_format == "base64" else r.embedding)
        for i, r in enumerate(results)
    ]
    tokens = sum(r.prompt_tokens for r in results)
    return EmbeddingResponse(
        data=data, model=body.model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    )


def _b64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


async def _stream(
    services: Services,
    body: CompletionRequest,
    handle: RequestHandle,
    meta: dict[str, Any],
    first: TokenEvent,
    events: AsyncIterator[TokenEvent],
    prompt_tokens: int,
) -> AsyncIterator[str]:
    n, ev = 0, first
    while True:
        n += ev.token_id is not None
        lp = None
        if body.logprobs is not None and ev.token_id is not None and ev.logprob is not None:
            lp = _logprobs(services, [ev.token_id], [ev.logprob]).model_dump()
        chunk = {
            **meta,
            "object": "text_completion",
            "choices": [{"text": ev.text, "index": 0, "logprobs": lp, "finish_reason": ev.finish_reason}],
        }
        if ev.finish_reason is not None:
            chunk["usage"] = usage(prompt_tokens, n).model_dump()
        yield dispatch.sse(chunk)
        if ev.finish_reason is not None:
            services.metrics.generated.labels(body.model).inc(n)
            yield "data: [DONE]\n\n"
            return
        ev = await events.__anext__()


async def _prompts(
    services: Services, prompt: str | list[str] | list[int] | list[list[int]], field: str = "prompt"
) -> list[list[int]]:
    if isinstance(prompt, str):
        return [await dispatch.prompt_ids(services, prompt, None)]
    if not prompt:
        raise InvalidRequest(f"{field}: expected a string, a list of strings, or token ids; got an empty list")
    if all(isinstance(p, int) for p in prompt):
        return [dispatch.check_ids(services, prompt, field)]  # type: ignore[arg-type]
    if all(isinstance(p, str) for p in prompt):
        return [await dispatch.prompt_ids(services, p, None) for p in prompt]  # type: ignore[arg-type]
    return [dispatch.check_ids(services, p, field) for p in prompt]  # type: ignore[arg-type]


def _logprobs(services: Services, ids: list[int], lps: list[float] | None) -> CompletionLogprobs:
    tok = services.backbone.tokenizer
    tokens = [tok.decode([i]) if tok is not None else str(i) for i in ids]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=list(lps or []),
        text_offset=offsets,
        top_logprobs=[{t: lp} for t, lp in zip(tokens, lps or [], strict=True)],
    )


def _epoch(iso: str | None, default: int) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp()) if iso else default
    except ValueError:
        return default
