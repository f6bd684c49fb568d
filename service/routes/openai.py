"""OpenAI-compatible POST /v1/completions, /v1/chat/completions, /v1/embeddings and GET /v1/models: the `model`
field names the task."""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response, StreamingResponse

from .. import dispatch, limits
from ..auth import InferenceAuth, is_admin, principal
from ..dispatch import TokenEvent
from ..http_errors import BadRequest, InvalidRequest
from ..images import MAX_IMAGES
from ..runtime import Backbone, EmbeddingResult, GenerationResult, RequestHandle, Unsupported
from ..schemas import (
    BASE_TASK,
    MAX_TASK_CHARS,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprob,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from ..state import Services, ServicesDep
from .common import ERRORS, Call, CallDep, token_text, usage

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], dependencies=[InferenceAuth])
ChunkBuilder = Callable[[int, TokenEvent, bool], dict[str, Any]]  # (choice index, event, its first?) -> SSE chunk
MAX_MODEL_CHARS = MAX_TASK_CHARS + 11  # a task name and its version pin (schemas.TaskName)


@router.get("/models", response_model=ModelList, responses=ERRORS, summary="Tasks, listed as OpenAI models")
async def models(services: ServicesDep) -> ModelList:
    """The tasks the key sees (its task globs; every task for an environment key), `base` first."""
    now = int(time.time())
    who = principal.get()
    cards = [
        ModelCard(id=t.name, created=_epoch(t.summary.get("created_at"), now))
        for t in await services.store.list_tasks()
        if who.sees(t.name)
    ]
    cards.insert(0, ModelCard(id=BASE_TASK, created=now))  # generates on causal LMs, embeds on encoders
    return ModelList(data=cards)


@router.get(
    "/models/{model}",
    response_model=ModelCard,
    responses=ERRORS,
    summary="One task, as an OpenAI model (`task@N`: that version)",
)
async def model(
    model: Annotated[str, Path(max_length=MAX_MODEL_CHARS, examples=["sentiment"])],
    call: CallDep,
    services: ServicesDep,
) -> ModelCard:
    """OpenAI's `models.retrieve`: the task's card, `created` from its current (or pinned) version; 404 for a task
    that does not exist or that the key does not see."""
    call.named(model)
    now = int(time.time())
    if call.task is None:
        return ModelCard(id=BASE_TASK, created=now)
    summary = await services.store.get_summary(call.task, call.version)
    return ModelCard(id=model, created=_epoch(summary.get("created_at"), now))


def encoder_can(bb: Backbone, route: str) -> str:
    """What a generation route on an encoder backbone answers: what this backbone does instead, and where."""
    return (
        f"{route} needs a causal LM backbone; {bb.name} is an encoder: it classifies (POST /v1/classify, a task with "
        "a classification head) and embeds (POST /v1/embeddings)"
    )


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses=ERRORS,
    summary="OpenAI-compatible text completion (`model` = task)",
)
async def completions(body: CompletionRequest, call: CallDep, services: ServicesDep) -> Response:
    # The body is a CompletionResponse serialised off the event loop (or a stream), documented by response_model.
    call.named(body.model)
    if services.backbone.is_encoder:
        raise Unsupported(encoder_can(services.backbone, "/v1/completions"))
    prompts = await _prompts(services, body.prompt)
    k = body.logprobs
    if k is not None:
        echoed = sum(map(len, prompts)) if body.echo else 0
        _check_logprob_entries(services, (echoed + len(prompts) * body.max_tokens) * body.n * (1 + k))
    params = await dispatch.sampling(
        services,
        body,
        max_new_tokens=body.max_tokens,
        logprobs=k is not None,
        top_logprobs=k or 0,
        prompt_logprobs=body.echo and k is not None,
    )
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    handles = await call.submit([(ids, None) for ids in prompts], params, n=body.n, user=body.user)
    if body.stream:
        base = {**meta, "object": "text_completion"}
        chunk = _completion_chunk(services, body, prompts, base)
        return await _stream_choices(call, handles, body, chunk, base, sum(map(len, prompts)) * body.n)
    results: list[GenerationResult] = await call.results(handles)
    if params.grammar is not None:
        services.trimmer.request()  # the rows' grammar matchers (their lexers grow as they match) are freed
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(r.completion_tokens for r in results)

    def build() -> bytes:  # per-token work for every choice: in the render pool, off the event loop
        echoes: dict[int, tuple[str, CompletionLogprobs | None]] = {}  # per prompt, shared by its n choices
        choices = []
        for i, r in enumerate(results):
            p = i // body.n
            if p not in echoes:
                echo_lp = _logprobs(services, [], [], None, k, prompts[p], r) if k is not None and body.echo else None
                echoes[p] = (_decode(services, prompts[p]) if body.echo else "", echo_lp)
            echoed, echo_lp = echoes[p]
            lp = None
            if k is not None:
                lp = _logprobs(services, r.token_ids, r.logprobs, r.top_logprobs, k, before=echo_lp)
            choices.append(CompletionChoice(text=echoed + r.text, index=i, finish_reason=r.finish_reason, logprobs=lp))
        response = CompletionResponse(**meta, choices=choices, usage=usage(prompt_tokens, completion_tokens))
        return response.model_dump_json().encode()

    content = await services.pools.render.run(build)
    if len(content) >= 1024**2:
        services.trimmer.request()  # the objects that built a large response are freed
    return Response(content, media_type="application/json")


def _completion_chunk(
    services: Services, body: CompletionRequest, prompts: list[list[int]], base: dict[str, Any]
) -> ChunkBuilder:
    """A completion chunk for one token of choice i; with echo, a choice's first chunk starts with its prompt."""

    def chunk(i: int, ev: TokenEvent, first: bool) -> dict[str, Any]:
        text = (_decode(services, prompts[i // body.n]) if body.echo and first else "") + ev.text
        lp = None
        if body.logprobs is not None and ev.token_id is not None and ev.logprob is not None:
            tops = [ev.top_logprobs] if ev.top_logprobs is not None else None
            lp = _logprobs(services, [ev.token_id], [ev.logprob], tops, body.logprobs).model_dump()
        return {**base, "choices": [{"text": text, "index": i, "logprobs": lp, "finish_reason": ev.finish_reason}]}

    return chunk


async def _stream_choices(
    call: Call,
    handles: list[RequestHandle],
    body: CompletionRequest | ChatCompletionRequest,
    chunk: ChunkBuilder,
    base: dict[str, Any],
    prompt_tokens: int,
) -> StreamingResponse:
    """The SSE response of n choices (completions and chat): `chunk(i, event, first)` builds each token's chunk;
    chunks of the choices interleave as their tokens come (each names its `index`), then `base` with the usage (with
    stream_options.include_usage) and [DONE]. The first event of every choice is awaited before any byte is sent,
    so a failure before the first token keeps its HTTP status."""
    firsts, rest = await call.stream(handles)

    async def events() -> AsyncIterator[str]:
        completion = 0
        for i, ev in enumerate(firsts):
            completion += ev.token_id is not None
            yield dispatch.sse(chunk(i, ev, True))
        async for i, ev in rest:
            completion += ev.token_id is not None
            yield dispatch.sse(chunk(i, ev, False))
        if body.stream_options is not None and body.stream_options.include_usage:
            yield dispatch.sse({**base, "choices": [], "usage": usage(prompt_tokens, completion).model_dump()})
        yield "data: [DONE]\n\n"

    return StreamingResponse(dispatch.guarded_stream(events(), *handles), media_type="text/event-stream")


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses=ERRORS,
    summary="OpenAI-compatible chat completion (`model` = task), the prompt built by the chat template",
)
async def chat_completions(
    body: ChatCompletionRequest, call: CallDep, services: ServicesDep
) -> ChatCompletionResponse | StreamingResponse:
    """The messages go through the task's own chat template (uploaded with the task, or set by the trainer), else
    the backbone tokenizer's; with neither, a 400 (never a guessed format)."""
    call.named(body.model)
    bb = services.backbone
    if bb.is_encoder:
        raise Unsupported(encoder_can(bb, "/v1/chat/completions"))
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequest("top_logprobs: goes with logprobs true")
    art = await call.artifact()
    ids = await _chat_prompt(services, body, art.chat_template if art is not None else None)
    limit = body.max_completion_tokens or body.max_tokens
    if limit is None:  # OpenAI's default is "what fits": here what fits, at most DEFAULT_CHAT_TOKENS
        room = (bb.max_positions or 4096) - len(ids) - (art.num_virtual_tokens if art is not None else 0)
        limit = max(1, min(DEFAULT_CHAT_TOKENS, room))
    if body.logprobs:
        _check_logprob_entries(services, limit * body.n * (1 + (body.top_logprobs or 0)))
    params = await dispatch.sampling(
        services, body, max_new_tokens=limit, logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0
    )
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    handles = await call.submit([(ids, None)], params, n=body.n, user=body.user)
    if body.stream:
        base = {**meta, "object": "chat.completion.chunk"}
        chunk = _chat_chunk(services, body, base)
        return await _stream_choices(call, handles, body, chunk, base, len(ids) * body.n)
    results: list[GenerationResult] = await call.results(handles)
    if params.grammar is not None:
        services.trimmer.request()  # the rows' grammar matchers (their lexers grow as they match) are freed
    choices = [
        ChatChoice(
            index=i,
            message=ChatResponseMessage(content=r.text),
            logprobs=_chat_logprobs(services, r.token_ids, r.logprobs, r.top_logprobs) if body.logprobs else None,
            finish_reason=r.finish_reason,
        )
        for i, r in enumerate(results)
    ]
    completion = sum(r.completion_tokens for r in results)
    return ChatCompletionResponse(**meta, choices=choices, usage=usage(len(ids) * body.n, completion))


tokens_router = APIRouter(tags=["OpenAI-compatible"], dependencies=[InferenceAuth])


@tokens_router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS, summary="Tokenize (vLLM's shape)")
async def tokenize(body: TokenizeRequest, request: Request, call: CallDep, services: ServicesDep) -> TokenizeResponse:
    call.named(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequest("give exactly one of 'prompt' and 'messages'")
    if body.messages is not None:  # renders a chat template, as the chat route does: one request of the key's limit
        await limits.charge_request(request)
    art = await call.artifact()
    if body.messages is not None:
        chat = ChatCompletionRequest(model=body.model, messages=body.messages)
        own = art.chat_template if art is not None else None
        ids = await _chat_prompt(services, chat, own)
        if own is not None and not is_admin(request):
            # A task's own template may carry its system prompt: an inference key learns how many tokens the chat
            # route would feed, never their text or ids (an admin key sees them).
            return TokenizeResponse(count=len(ids), max_model_len=services.backbone.max_positions)
    else:
        tok = services.backbone.tokenizer
        if tok is None:
            raise Unsupported(f"backbone {services.backbone.name} has no tokenizer")
        enc = await services.pools.tokenize.run(lambda: tok(body.prompt, add_special_tokens=body.add_special_tokens))
        ids = list(enc["input_ids"])
    strs = [token_text(services, i) for i in ids]
    return TokenizeResponse(count=len(ids), max_model_len=services.backbone.max_positions, tokens=ids, token_strs=strs)


@tokens_router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS, summary="Detokenize")
async def detokenize(body: DetokenizeRequest, call: CallDep, services: ServicesDep) -> DetokenizeResponse:
    call.named(body.model)
    await call.check_task()  # an unknown task is a 404, as everywhere
    ids = dispatch.check_ids(services, body.tokens, "tokens")
    return DetokenizeResponse(prompt=_decode(services, ids))


DEFAULT_CHAT_TOKENS = 1024


async def _chat_prompt(services: Services, body: ChatCompletionRequest, task_template: str | None) -> list[int]:
    tok = services.backbone.tokenizer
    if tok is None:
        raise Unsupported(f"backbone {services.backbone.name} has no tokenizer: chat needs one")
    template = task_template or getattr(tok, "chat_template", None)
    if not template:
        raise BadRequest(
            f"no chat template: task {body.model!r} has none and backbone {services.backbone.name} has none; upload "
            "the task with one (PUT /v1/tasks/{task}, form field chat_template) or use /v1/completions"
        )
    conversation = [
        {
            "role": "system" if m.role == "developer" else m.role,
            "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content),
        }
        for m in body.messages
    ]
    owner = f"task {body.model!r}" if task_template else f"backbone {services.backbone.name}"
    assert services.templates is not None, "a backbone with a tokenizer has a template renderer"
    ids = await services.templates.render(template, conversation, owner=owner)
    if not ids:
        raise InvalidRequest("messages: the chat template rendered no tokens")
    return ids


def _chat_chunk(services: Services, body: ChatCompletionRequest, base: dict[str, Any]) -> ChunkBuilder:
    """OpenAI's chat chunk for one token of choice i: the first carries the role, the last the finish_reason."""

    def chunk(i: int, ev: TokenEvent, first: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant", "content": ev.text} if first else {"content": ev.text}
        lp = None
        if body.logprobs and ev.token_id is not None and ev.logprob is not None:
            tops = [ev.top_logprobs] if ev.top_logprobs is not None else None
            lp = _chat_logprobs(services, [ev.token_id], [ev.logprob], tops).model_dump()
        return {**base, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": ev.finish_reason}]}

    return chunk


def _chat_logprobs(
    services: Services, ids: list[int], lps: list[float] | None, tops: list[list[tuple[int, float]]] | None
) -> ChatChoiceLogprobs:
    def entry(token_id: int, lp: float, alternatives: list[tuple[int, float]]) -> ChatLogprob:
        text = token_text(services, token_id)
        return ChatLogprob(
            token=text,
            logprob=lp,
            bytes=list(text.encode()),
            top_logprobs=[entry(i, v, []) for i, v in alternatives],
        )

    alts = tops or [[] for _ in ids]
    return ChatChoiceLogprobs(content=[entry(i, lp, a) for i, lp, a in zip(ids, lps or [], alts, strict=True)])


def _decode(services: Services, ids: list[int]) -> str:
    tok = services.backbone.tokenizer
    return tok.decode(ids, skip_special_tokens=True) if tok is not None else ""


@router.post(
    "/embeddings",
    response_model=EmbeddingResponse,
    responses=ERRORS,
    summary="OpenAI-compatible embeddings (`model` = task): the pooled encoder state, unit length",
)
async def embeddings(body: EmbeddingRequest, call: CallDep, services: ServicesDep) -> EmbeddingResponse:
    """Each input's pooled state as the backbone pools it (all-MiniLM-L6-v2: the mean of its tokens; a ViT: [CLS]
    after the final LayerNorm), L2-normalised, through the task's prefix (any method) or through the bare backbone
    (`model` = "base"). Rows of every task share the batch with classification rows. Inputs are embedded as given
    (a task's classification template is not applied)."""
    call.named(body.model)
    bb = services.backbone
    if not bb.is_encoder:
        raise Unsupported(f"embeddings are pooled encoder states: backbone {bb.name} is a causal LM")
    if body.dimensions is not None and body.dimensions != bb.fingerprint.hidden_size:
        raise InvalidRequest(
            f"dimensions: this backbone embeds in {bb.fingerprint.hidden_size} dimensions (no truncation), "
            f"got {body.dimensions}"
        )
    await call.artifact()  # an unknown task fails before any input is read
    if bb.is_image:
        given = [body.input] if isinstance(body.input, str) else body.input
        images = [x for x in given if isinstance(x, str)]
        if len(images) != len(given) or len(images) > MAX_IMAGES:
            raise InvalidRequest(
                f"input: backbone {bb.name} embeds images: expected up to {MAX_IMAGES} base64 images or data URLs"
            )
        handles = await call.submit_images(images, embed=True)
    else:
        prompts = await _prompts(services, body.input, "input")
        handles = await call.submit([(ids, None) for ids in prompts], embed=True, user=body.user)
    results: list[EmbeddingResult] = await call.results(handles)
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


async def _prompts(
    services: Services, prompt: str | list[str] | list[int] | list[list[int]], field: str = "prompt"
) -> list[list[int]]:
    if isinstance(prompt, str):
        return [await dispatch.prompt_ids(services, prompt, None)]
    if not prompt:
        raise InvalidRequest(f"{field}: expected a string, a list of strings, or token ids; got an empty list")
    ids = [p for p in prompt if isinstance(p, int)]
    if len(ids) == len(prompt):
        return [dispatch.check_ids(services, ids, field)]
    texts = [p for p in prompt if isinstance(p, str)]
    if len(texts) == len(prompt):
        return [await dispatch.prompt_ids(services, p, None) for p in texts]
    lists = [p for p in prompt if isinstance(p, list)]
    if len(lists) != len(prompt):  # the request schemas take no mixed list
        raise InvalidRequest(f"{field}: expected a string, a list of strings, or token ids; got a mixed list")
    return [dispatch.check_ids(services, p, field) for p in lists]


def _logprobs(
    services: Services,
    ids: list[int],
    lps: list[float] | None,
    tops: list[list[tuple[int, float]]] | None,
    k: int,
    prompt: list[int] | None = None,
    result: GenerationResult | None = None,
    before: CompletionLogprobs | None = None,
) -> CompletionLogprobs:
    """The legacy completions shape; with echo the prompt's tokens come first (the first with no log-probability):
    from `prompt` and its `result`, or `before` (the echoed part already built, shared by a prompt's choices).
    top_logprobs: the k most likely tokens per position (k = 0: the chosen token alone)."""
    tokens: list[str] = [] if before is None else list(before.tokens)
    values: list[float | None] = [] if before is None else list(before.token_logprobs)
    alternatives: list[dict[str, float] | None] = [] if before is None else list(before.top_logprobs)
    if prompt is not None and result is not None and result.prompt_logprobs is not None:
        for tid, entry in zip(prompt, result.prompt_logprobs, strict=True):
            tokens.append(token_text(services, tid))
            values.append(None if entry is None else entry[0])
            alternatives.append(None if entry is None else _alternatives(services, tid, entry[0], entry[1], k))
    for j, (tid, lp) in enumerate(zip(ids, lps or [], strict=True)):
        tokens.append(token_text(services, tid))
        values.append(lp)
        alternatives.append(_alternatives(services, tid, lp, tops[j] if tops else [], k))
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, text_offset=offsets, top_logprobs=alternatives)


def _check_logprob_entries(services: Services, entries: int) -> None:
    """Refuses, before anything runs, a request whose response would carry more log-probability entries than the
    server allows (each (token, log-probability) pair, alternatives included, echoed prompts once per choice)."""
    limit = services.settings.max_logprob_entries
    if entries > limit:
        raise BadRequest(
            f"logprobs: this request asks for up to {entries} log-probability entries (tokens x choices x (1 + "
            f"alternatives), echoed prompts included); the server allows {limit} (PREFIXSERVE_MAX_LOGPROB_ENTRIES): "
            "ask for fewer prompts, choices, tokens or alternatives"
        )


def _alternatives(
    services: Services, token_id: int, lp: float, tops: list[tuple[int, float]], k: int
) -> dict[str, float]:
    if not k:
        return {token_text(services, token_id): lp}
    return {token_text(services, i): v for i, v in tops[:k]}


def _epoch(iso: str | None, default: int) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp()) if iso else default
    except ValueError:
        return default
