"""Admin routes over the prefix store: list, inspect, upload, delete, roll back; split traffic between versions; pin
a task resident on every replica."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from pydantic import ValidationError
from safetensors.torch import save as st_save

from prefix_store import (
    PrefixArtifact,
    check_chat_template,
    check_template,
    encode,
    validate_task_name,
)
from prefix_store.bitfit_io import export_bias_state_dict, parse_verbalizer
from prefix_store.importers import FORMATS, ImportContext, import_adapter
from prefix_store.methods import with_peft_type

from ..auth import AdminAuth
from ..http_errors import BadRequest, InvalidRequest, PayloadTooLarge
from ..metrics import confirm_task, name_task, task_deleted
from ..runtime.bias import checkpoint_references, verbalizer_tokens
from ..runtime.methods import check as check_artifact
from ..schemas import (
    BASE_TASK,
    ErrorBody,
    PinResponse,
    RollbackRequest,
    TaskDetail,
    TaskInfo,
    TaskList,
    TrafficRequest,
    VersionSummary,
)
from ..sources import SourceUpload, hub_files, local_files, read_adapter
from ..state import Services, ServicesDep


async def _label_task(request: Request) -> AsyncIterator[None]:
    """The metrics' task label: the path's task once the route succeeded on it (see metrics.name_task)."""
    if "task" in request.path_params:
        name_task(request, request.path_params["task"])
    yield
    if "task" in request.path_params:
        confirm_task(request)


router = APIRouter(prefix="/v1/tasks", tags=["tasks (admin)"], dependencies=[AdminAuth, Depends(_label_task)])


MAX_PAGE = 200  # tasks per page: each costs a read of its current version's summary


@router.get(
    "",
    response_model=TaskList,
    summary="Every task with its current version, or a page of those whose name contains q",
    description="Sorted by name. `q` keeps the tasks whose name contains it; `offset` and `limit` (at most "
    f"{MAX_PAGE}) take one page of those. The header X-Total-Count says how many tasks match, whatever the page.",
)
async def list_tasks(
    services: ServicesDep,
    response: Response,
    q: Annotated[str, Query(max_length=128, description="keep tasks whose name contains this", examples=["sst"])] = "",
    offset: Annotated[int, Query(ge=0, le=10_000_000, description="skip this many matching tasks")] = 0,
    limit: Annotated[
        int | None, Query(ge=1, le=MAX_PAGE, description=f"at most this many tasks (1-{MAX_PAGE}); default: all")
    ] = None,
) -> TaskList:
    names = await services.store.task_names(q)
    response.headers["X-Total-Count"] = str(len(names))
    page = names[offset:] if limit is None else names[offset : offset + limit]
    infos = await services.store.list_tasks(page)
    return TaskList(
        tasks=[
            TaskInfo(
                task=t.name,
                current_version=t.current,
                versions=t.versions,
                resident=services.engine.is_resident(t.name, t.current),
                current=VersionSummary(**t.summary),
            )
            for t in infos
        ]
    )


@router.get("/{task}", response_model=TaskDetail, summary="One task with every stored version, its split and pin")
async def get_task(task: str, services: ServicesDep) -> TaskDetail:
    history = await services.store.versions(task)
    routing = await services.store.routing(task)
    current = routing.current
    by_version = {s["version"]: s for s in history}
    return TaskDetail(
        task=task,
        current_version=current,
        versions=sorted(by_version),
        resident=services.engine.is_resident(task, current),
        current=VersionSummary(**by_version[current]),
        history=[VersionSummary(**s) for s in history],
        traffic=None if routing.traffic is None else {str(v): w for v, w in sorted(routing.traffic.items())},
        pinned=routing.pinned,
        pinned_here=services.engine.pins.get(task) == current,
    )


@router.put(
    "/{task}/traffic",
    response_model=TaskDetail,
    summary="Split the task's unpinned requests between versions",
    description='Weights per stored version (`{"weights": {"1": 90, "2": 10}}`); every replica applies it '
    "at once. An unpinned request falls on a version by a hash of its X-Request-ID (the same id, the same version), "
    "at random without one; `task@N` still pins N. Stored with the task: it survives restarts. A publish leaves it "
    "as it is (the new version gets unpinned traffic once the split names it); a rollback clears it.",
    responses={404: {"model": ErrorBody, "description": "unknown task, or versions that do not exist (named)"}},
)
async def set_traffic(task: str, body: TrafficRequest, services: ServicesDep) -> TaskDetail:
    await services.store.set_traffic(task, {int(v): w for v, w in body.weights.items()})
    return await get_task(task, services)


@router.delete(
    "/{task}/traffic",
    status_code=204,
    summary="Remove the task's traffic split: every unpinned request runs the current version",
    responses={404: {"model": ErrorBody, "description": "unknown task"}},
)
async def delete_traffic(task: str, services: ServicesDep) -> Response:
    await services.store.set_traffic(task, None)
    return Response(status_code=204)


@router.post(
    "/{task}/pin",
    response_model=PinResponse,
    summary="Keep the task resident in every replica's device prefix cache",
    description="Its current version is loaded and never evicted (the pin follows the current version), on this "
    "replica before the pin is stored, then on every replica as it hears of it (retried there while running "
    "requests hold the room; `pinned_here` in GET /v1/tasks/{task} says whether the replica answering holds it). "
    "Pins may hold PREFIXSERVE_PIN_FRACTION (default half) of PREFIXSERVE_DEVICE_CACHE_BYTES, the rest staying for "
    "every other task and version: a pin beyond what other pins leave of it is refused (507, bytes needed and left).",
    responses={
        404: {"model": ErrorBody, "description": "unknown task"},
        503: {"model": ErrorBody, "description": "running requests hold the device cache now; retry"},
        507: {"model": ErrorBody, "description": "the pins would pass their share of the device prefix cache"},
    },
)
async def pin(task: str, services: ServicesDep) -> PinResponse:
    assert services.warm is not None, "the lifespan builds the warm set"
    version, nbytes = await services.warm.pin(task)
    return PinResponse(task=task, version=version, bytes=nbytes)


@router.delete(
    "/{task}/pin",
    status_code=204,
    summary="Unpin the task: its prefix becomes an ordinary cache entry again, on every replica",
    responses={404: {"model": ErrorBody, "description": "unknown task"}},
)
async def unpin(task: str, services: ServicesDep) -> Response:
    assert services.warm is not None, "the lifespan builds the warm set"
    await services.warm.unpin(task)
    return Response(status_code=204)


MAX_CHAT_TEMPLATE = 65536  # characters
UPLOAD_EXAMPLES = {
    "peft": {
        "summary": "a PEFT adapter directory's two files, with the class names of its SEQ_CLS head",
        "value": {
            "adapter_config": "(adapter_config.json)",
            "adapter_model": "(adapter_model.safetensors)",
            "labels": "negative,positive",
        },
    },
    "artifact": {"summary": "a prefix-serve artifact (GET /v1/tasks/{task}/artifact)", "value": {"artifact": "(file)"}},
    "chat": {
        "summary": "a PEFT adapter for a causal LM, with its chat template (a file part or a plain field)",
        "value": {
            "adapter_config": "(adapter_config.json)",
            "adapter_model": "(adapter_model.safetensors)",
            "chat_template": "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}<|assistant|>",
        },
    },
}


@router.put(
    "/{task}",
    response_model=VersionSummary,
    status_code=201,
    summary="Upload a new version (a PEFT adapter, a BitFit checkpoint or a prefix-serve artifact)",
    description="multipart/form-data with either `adapter_config` (PEFT adapter_config.json) and `adapter_model` "
    "(PEFT adapter_model.safetensors), or `state_dict` (a BitFit fine-tune's safetensors state dict: its biases "
    "minus the backbone's become a bitfit task; other weights must equal the backbone's), or `artifact` (a "
    'prefix-serve artifact). Or, with a JSON body, an adapter by reference: `{"source": "owner/name", '
    '"revision"?, "subfolder"?}` from the Hugging Face Hub, or `{"source": "/abs/path"}` inside a directory '
    "PREFIXSERVE_ADAPTER_DIRS allows (403 outside it), plus `labels`, `method`, `chat_template`. The adapter is "
    "checked against the serving backbone, stored as the task's next version, and made current. `chat_template` is "
    'a form field or a file part: `-F chat_template=@template.jinja` and `-F "chat_template=<template.jinja"` '
    "both work. Local paths in the adapter's metadata (PEFT's base_model_name_or_path, a trainer's data files) are "
    "stored as their base names: the uploader's directories stay theirs.",
    openapi_extra={"requestBody": {"content": {"multipart/form-data": {"examples": UPLOAD_EXAMPLES}}}},
)
async def upload(
    task: str,
    services: ServicesDep,
    request: Request,
    adapter_config: Annotated[UploadFile | None, File(description="PEFT adapter_config.json")] = None,
    adapter_model: Annotated[UploadFile | None, File(description="PEFT adapter_model.safetensors")] = None,
    artifact: Annotated[UploadFile | None, File(description="a prefix-serve artifact (.safetensors)")] = None,
    labels: Annotated[str | None, Form(description="class names for a SEQ_CLS adapter: JSON list or a,b,c")] = None,
    method: Annotated[
        str | None,
        Form(description=f"one of {', '.join(with_peft_type('PREFIX_TUNING'))} (PEFT cannot tell them apart)"),
    ] = None,
    state_dict: Annotated[UploadFile | None, File(description="a BitFit checkpoint (.safetensors state dict)")] = None,
    verbalizer: Annotated[
        str | None, Form(description="with state_dict: label=word pairs read at [MASK], e.g. neg=terrible,pos=great")
    ] = None,
    template: Annotated[
        str | None, Form(description='with state_dict: the input template, e.g. "{text} [MASK]"')
    ] = None,
    vpt_checkpoint: Annotated[
        UploadFile | None, File(description="a VPT reference-code checkpoint converted to safetensors")
    ] = None,
    chat_template: Annotated[
        UploadFile | str | None,
        Form(
            description="with any upload: the task's Jinja chat template for /v1/chat/completions, a form field or a "
            f"file part (UTF-8, at most {MAX_CHAT_TEMPLATE} characters)"
        ),
    ] = None,
) -> VersionSummary:
    validate_task_name(task)
    if task == BASE_TASK:
        raise BadRequest(f"{BASE_TASK!r} is reserved for the bare backbone: choose another task name")
    limit = services.settings.max_artifact_bytes
    if request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
        return await _upload_from_source(task, services, await request.body())
    uploads = {
        "adapter_config": adapter_config,
        "adapter_model": adapter_model,
        "artifact": artifact,
        "state_dict": state_dict,
        "vpt_checkpoint": vpt_checkpoint,
    }
    parts = [n for n, p in uploads.items() if p is not None]
    form = _FORM_OF_PARTS.get(tuple(parts))
    if form != "state_dict" and (verbalizer, template) != (None, None):
        raise BadRequest("'verbalizer' and 'template' go with a 'state_dict' upload")
    if form is None:
        raise BadRequest(
            "expected either the two parts 'adapter_config' and 'adapter_model', or one part 'artifact', "
            f"'state_dict' or 'vpt_checkpoint'; got {parts or 'none'}"
        )
    files = {}
    for part, file_name in zip(parts, FORMATS[form][0], strict=True):  # the form's files, in the parts' order
        upload_file = uploads[part]
        assert upload_file is not None
        files[file_name] = await _read(upload_file, 1024**2 if part == "adapter_config" else limit, part)
    ctx = _import_context(services, task, labels=_labels(labels), method=method, verbalizer=verbalizer)
    if form == "state_dict":
        if template is not None:
            check_template(template)
        ctx = dataclasses.replace(ctx, references=checkpoint_references(services.backbone), template=template)
    art = await services.pools.imports.run(import_adapter, form, files, ctx)  # off the loop, bounded
    return await _publish(services, _without_local_paths(art), await _chat_template_text(chat_template))


async def _upload_from_source(task: str, services: Services, body: bytes) -> VersionSummary:
    """PUT with a JSON body {"source": ...}: the adapter is fetched (hub) or read (allowed path), then checked and
    published exactly as an upload of the same files."""
    try:
        spec = SourceUpload.model_validate_json(body)
    except ValidationError as e:
        where = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in e.errors())
        raise InvalidRequest(where) from None
    limit = services.settings.max_artifact_bytes
    kind = spec.kind or ("path" if spec.source.startswith("/") else "hub")

    def fetch() -> tuple[str, dict[str, bytes]]:
        if kind == "path":
            allowed = services.settings.adapter_dirs
            return read_adapter(local_files(spec.source, allowed), limit, allowed=allowed)
        return read_adapter(hub_files(spec.source, spec.revision, spec.subfolder, limit), limit)

    form, files = await services.pools.sources.run(fetch)  # disk and network: off the event loop, in their own pool
    ctx = _import_context(services, task, labels=spec.labels, method=spec.method, verbalizer=None)
    art = _without_local_paths(await services.pools.imports.run(import_adapter, form, files, ctx))
    art.training = {**art.training, "source": {"kind": kind, "name": spec.source, "revision": spec.revision}}
    return await _publish(services, art, spec.chat_template)


@router.get(
    "/{task}/state_dict",
    summary="A bias (bitfit) task as a state dict of its tuned biases",
    description="safetensors bytes: the serving backbone's biases plus the task's deltas, under transformers' "
    "parameter names (with `base_prefix`, e.g. `bert.` for BertForMaskedLM), and a linear head as `classifier.*` "
    "or `score.*`; `model.load_state_dict(sd, strict=False)` applies it.",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, 400: {"model": ErrorBody}},
)
async def export_state_dict(
    task: str,
    services: ServicesDep,
    version: Annotated[int | None, Query(ge=1, description="default: the current version")] = None,
    base_prefix: Annotated[str, Query(max_length=64, pattern=r"^([A-Za-z_][A-Za-z0-9_]*\.)?$")] = "",
) -> Response:
    art = await services.store.get(task, version)
    base, _ = checkpoint_references(services.backbone)
    check_artifact(services.backbone, art)
    tensors = export_bias_state_dict(art, base, base_prefix=base_prefix)
    return Response(st_save(tensors), media_type="application/octet-stream")


@router.get(
    "/{task}/artifact",
    summary="A task version as a prefix-serve artifact (safetensors), to back up or upload elsewhere",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, 404: {"model": ErrorBody}},
)
async def export_artifact(
    task: str,
    services: ServicesDep,
    version: Annotated[int | None, Query(ge=1, description="default: the current version")] = None,
) -> Response:
    art = await services.store.get(task, version)
    return Response(encode(art), media_type="application/octet-stream")


@router.delete(
    "/{task}",
    status_code=204,
    summary="Delete a task (with its traffic split and pin), or one non-current version of it",
    responses={
        409: {"model": ErrorBody, "description": "the version is current, or named by the traffic split"},
        404: {"model": ErrorBody, "description": "unknown task or version"},
    },
)
async def delete_task(
    task: str,
    services: ServicesDep,
    request: Request,
    version: Annotated[int | None, Query(ge=1, description="delete only this version", examples=[2])] = None,
) -> Response:
    await services.store.delete(task, version)
    if version is None:
        task_deleted(request)
    return Response(status_code=204)


@router.post(
    "/{task}/rollback",
    response_model=VersionSummary,
    summary="Make an existing version current again (and clear the traffic split: everything runs it)",
)
async def rollback(task: str, body: RollbackRequest, services: ServicesDep) -> VersionSummary:
    await services.store.rollback(task, body.version)
    return VersionSummary(**await services.store.get_summary(task, body.version))


def _import_context(
    services: Services, task: str, *, labels: list[str] | None, method: str | None, verbalizer: str | None
) -> ImportContext:
    """What every upload form is imported for: this task on the serving backbone, with the options given (a
    verbalizer's words become the backbone's token ids, its labels the head's)."""
    bb = services.backbone
    token_ids = None
    if verbalizer is not None:
        if len(verbalizer) > 20_000:
            raise BadRequest(f"verbalizer: expected at most 20000 characters, got {len(verbalizer)}")
        try:
            labels, token_ids = verbalizer_tokens(bb.tokenizer, parse_verbalizer(verbalizer))
        except ValueError as e:
            raise BadRequest(str(e)) from None
    return ImportContext(
        task=task,
        backbone=bb.fingerprint,
        max_bytes=services.settings.max_artifact_bytes,
        labels=labels,
        method=method,
        verbalizer=token_ids,
    )


async def _chat_template_text(value: UploadFile | str | None) -> str | None:
    """The chat template as text, from a form field (`-F "chat_template=<file"`) or a file part (`-F
    chat_template=@file`), bounded either way."""
    if value is None or isinstance(value, str):
        text = value
    else:
        raw = await value.read(4 * MAX_CHAT_TEMPLATE + 1)  # UTF-8 takes at most 4 bytes a character
        if len(raw) > 4 * MAX_CHAT_TEMPLATE:
            raise BadRequest(f"chat_template: expected at most {MAX_CHAT_TEMPLATE} characters, got a larger file")
        try:
            text = raw.decode()
        except UnicodeDecodeError as e:
            raise BadRequest(f"chat_template: expected a UTF-8 text file, got undecodable bytes at {e.start}") from None
    if text is not None and len(text) > MAX_CHAT_TEMPLATE:
        raise BadRequest(f"chat_template: expected at most {MAX_CHAT_TEMPLATE} characters, got {len(text)} or more")
    return text


# A local file system path (POSIX or Windows, absolute, home-relative or explicitly relative), as opposed to a hub
# id such as "sentence-transformers/all-MiniLM-L6-v2".
_LOCAL_PATH = re.compile(r"^(/|~|\.{1,2}[/\\]|[A-Za-z]:[/\\]|\\\\)")


def _without_local_paths(art: PrefixArtifact) -> PrefixArtifact:
    """The artifact with every local path in its training metadata (the directory PEFT recorded as the base model,
    the trainer's data files: the uploader's machine, not this one) cut to its base name."""

    def clean(value: object, depth: int = 0) -> object:
        if isinstance(value, str) and _LOCAL_PATH.match(value):
            return re.split(r"[/\\]", value.rstrip("/\\"))[-1]
        if depth >= 64:  # metadata is parsed JSON, whose nesting the body limit bounds; this bounds the recursion
            return value
        if isinstance(value, dict):
            return {k: clean(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v, depth + 1) for v in value]
        return value

    training = clean(art.training)
    return art if training == art.training else dataclasses.replace(art, training=training)


# The multipart parts of each upload form, in the order its importer names its files (prefix_store.importers).
_FORM_OF_PARTS = {
    ("adapter_config", "adapter_model"): "peft",
    ("artifact",): "artifact",
    ("state_dict",): "state_dict",
    ("vpt_checkpoint",): "vpt_checkpoint",
}


async def _publish(services: Services, art: PrefixArtifact, chat_template: str | None = None) -> VersionSummary:
    """Every upload's last step, whatever its form: the task's chat template (if given), the check against the
    serving backbone, the store."""
    if chat_template is not None:
        if services.backbone.is_encoder:
            raise BadRequest(f"chat_template: backbone {services.backbone.name} is an encoder (no generation)")
        art = dataclasses.replace(art, chat_template=check_chat_template(chat_template))
        if services.templates is None:
            raise BadRequest(f"chat_template: backbone {services.backbone.name} has no tokenizer to render it with")
        await services.templates.check(art.chat_template)
    check_artifact(services.backbone, art)
    stored = await services.store.put(art)
    return VersionSummary(**stored.summary())


async def _read(part: UploadFile, limit: int, name: str) -> bytes:
    data = await part.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"upload part '{name}' is larger than the limit of {limit} bytes")
    return data


def _labels(raw: str | None) -> list[str] | None:
    if raw is None or not raw.strip():
        return None
    raw = raw.strip()
    if raw.startswith("["):
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as e:
            raise BadRequest(
                f"labels: expected a JSON list of strings or a comma-separated list, got {raw!r}: {e}"
            ) from None
        if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
            raise BadRequest(f"labels: expected a JSON list of strings, got {raw!r}")
        return parsed
    return [x.strip() for x in raw.split(",")]
