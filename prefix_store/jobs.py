"""Training jobs: their record (TrainSpec, what the service queues and the trainer runs) and their queue, a Redis
Stream read through a consumer group, plus one hash per job for its state.

  {N:train}:jobs        stream of {"job": id}; consumer group "trainers"
  {N:train}:jobs:workers  sorted set: each worker's name, scored by when it last said it was alive
  {N:train}:job:id      hash: state (queued | running | succeeded | failed | cancelled), spec (without its inline
                      examples), examples (the inline records, JSON, only until the job ends), inline_examples and
                      inline_dev_examples (their counts), progress, result, error, worker, attempts, created_at,
                      updated_at, ended_at, expires_at, cancelled_at, released_at (JSON where structured)

Both share the hash tag {N:train} (keys.py), so queuing a job (its hash and its stream entry in one MULTI) works on
Redis Cluster too, where the whole queue lives in one slot.

Several workers share the group, each message going to one of them. A worker keeps its message's idle time low
with a heartbeat (XCLAIM ... JUSTID) while it trains; a message whose worker died goes idle and the next worker
takes it over with XAUTOCLAIM. A message is acknowledged (and deleted from the stream) only when its job has ended,
either way.

State changes are one Lua script each on the job's hash, so a cancel and a worker never overwrite each other: a
worker starts only a queued (or taken-over running) job, a cancel ends only a queued or running one, a worker's
result lands only on a job still running, and progress is written only while it runs. A job that ends loses its
inline examples and expires after the queue's ttl_s (PREFIXSERVE_JOB_TTL_S).

Paths in a spec (`data`, `dev_data`, `export_peft`) are files on the trainer's machine. On the queue path they must
lie inside the allowed directories (PREFIXSERVE_TRAIN_DATA_DIRS, PREFIXSERVE_EXPORT_DIRS): `allowed_path` resolves
them (symbolic links and `..` first) the way service/sources.py checks PREFIXSERVE_ADAPTER_DIRS, and is called by the
service at submission and by the worker again before it reads or writes anything.
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator
from redis.exceptions import ResponseError

from .artifact import check_template, validate_task_name
from .errors import ArtifactError, PrefixStoreError, StoreUnavailable
from .keys import KeyLayout
from .methods import METHODS, REGISTRY, MethodName, described
from .store import TRANSIENT, Client, refresh_slots_on_fault, register_script, reply

T = TypeVar("T")
GROUP = "trainers"
_JSON_FIELDS = ("spec", "progress", "result")
ACTIVE = ("queued", "running")
ENDED = ("succeeded", "failed", "cancelled")
DEFAULT_TTL_S = 7 * 24 * 3600
MAX_JOB_INDEX = 10_000  # jobs a listing can reach (JobQueue.recent), newest first; older ones stay readable by id
INLINE = ("examples", "dev_examples")  # spec fields kept apart from the spec, and dropped when the job ends
# The fields of a job's view: everything but its inline examples, which can be hundreds of megabytes.
VIEW_FIELDS = (
    "state",
    "spec",
    "progress",
    "result",
    "error",
    "worker",
    "attempts",
    "created_at",
    "updated_at",
    "ended_at",
    "expires_at",
    "cancelled_at",
    "released_at",
    "inline_examples",
    "inline_dev_examples",
)
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # ids become file names under the worker's work directory
TRAIN_DATA_SETTING = "PREFIXSERVE_TRAIN_DATA_DIRS"
EXPORT_SETTING = "PREFIXSERVE_EXPORT_DIRS"


class JobNotFound(PrefixStoreError, LookupError):
    pass


class JobEnded(PrefixStoreError):
    """The job has ended (succeeded, failed or cancelled): it cannot be cancelled any more."""


class JobPathError(PrefixStoreError, ValueError):
    """A path in a training job that is not a usable path (relative, a NUL byte, too long)."""


class PathNotAllowed(JobPathError):
    """A path in a training job outside the directories the process allows. Nothing was read or written there."""


# -- paths ----------------------------------------------------------------------------------------------------------
def allowed_path(
    path: str | Path, allowed: Sequence[str | Path], *, what: str, setting: str, quote: bool = True
) -> Path:
    """`path` resolved (symbolic links and .. followed, as service.sources.local_files does for adapters), once it is
    known to lie inside one of the `allowed` directories (resolved the same way). Raises PathNotAllowed outside them
    or when none is allowed, JobPathError for a path that is not absolute. The path need not exist (an export
    directory is made later); nothing is opened or read. `quote`: name the path in the message (not for a path
    read from a data file, which is the file's content)."""
    if not allowed:
        raise PathNotAllowed(f"{what}: paths are off: this process allows no directory ({setting})")
    raw = str(path)
    shown = f" {raw!r:.300}" if quote else ""
    if len(raw) > 4096:
        raise JobPathError(f"{what}: expected a path of at most 4096 characters, got {len(raw)}")
    p = Path(raw)
    if not p.is_absolute():
        raise JobPathError(f"{what}: a path must be absolute, got{shown or ' a relative one'}")
    try:
        resolved = p.resolve()
        roots = [Path(d).resolve() for d in allowed]
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a symbolic-link loop (3.11: RuntimeError)
        raise JobPathError(f"{what}{shown}: not a usable path ({type(e).__name__})") from None
    if not inside(resolved, roots):
        raise PathNotAllowed(f"{what}{shown} is outside the directories this process allows ({setting})")
    return resolved


def inside(resolved: Path, roots: Sequence[Path]) -> bool:
    """Whether a resolved path is one of `roots` (resolved directories) or lies under one."""
    return any(resolved == r or resolved.is_relative_to(r) for r in roots)


def check_job_paths(spec: TrainSpec, *, data_dirs: Sequence[str], export_dirs: Sequence[str]) -> TrainSpec:
    """The spec with its file paths resolved, each checked against the allowed directories (data and dev data
    against `data_dirs`, the PEFT export against `export_dirs`). The service calls it at submission and the worker
    again before it reads anything: a path outside is refused (PathNotAllowed), never opened."""
    update: dict[str, str] = {}
    for name in ("data", "dev_data"):
        value = getattr(spec, name)
        if value is not None:
            update[name] = str(allowed_path(value, data_dirs, what=name, setting=TRAIN_DATA_SETTING))
    if spec.export_peft is not None:
        update["export_peft"] = str(
            allowed_path(spec.export_peft, export_dirs, what="export_peft", setting=EXPORT_SETTING)
        )
    return spec.model_copy(update=update) if update else spec


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise JobNotFound(f"training job {job_id!r:.80} not found (ids are 1-128 letters, digits, '_', '-')")
    return job_id


# -- label names ----------------------------------------------------------------------------------------------------
MAX_LABELS = 1024
MAX_LABEL_CHARS = 64
# Besides letters, marks, digits and emoji-like symbols: the punctuation real label sets use ("Sci/Tech",
# "not_entailment", "rock & roll", "4+"). Not ':', '=', '$', '#', quotes, brackets or control characters: the
# shapes of configuration lines and password entries, so a file read as data cannot turn its lines into the labels
# a task serves.
LABEL_PUNCTUATION = frozenset(" _-.,'&+()/!?")
MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")  # a module path, or its last parts (target_modules)
ALL_LINEAR = "all-linear"  # PEFT's name for every linear projection (its output layer aside)


def check_label_names(labels: Sequence[str], what: str, *, quote: bool = False) -> list[str]:
    """Raises ValueError unless `labels` are 1 to MAX_LABELS distinct names of 1 to MAX_LABEL_CHARS characters
    (letters, digits, marks, symbols like emoji, the punctuation of LABEL_PUNCTUATION; no leading or trailing space).
    Messages name a label by its position and only quote it when `quote` is set (the caller's own input): labels
    read from a file are file content, and errors never quote file content."""
    if len(labels) > MAX_LABELS:
        raise ValueError(f"{what}: expected at most {MAX_LABELS} labels, found {len(labels)}")
    for i, label in enumerate(labels):
        name = f"{what}[{i}]" + (f" {label!r:.80}" if quote else "")
        if not isinstance(label, str) or not 1 <= len(label) <= MAX_LABEL_CHARS:
            size = len(label) if isinstance(label, str) else type(label).__name__
            raise ValueError(f"{name}: expected 1 to {MAX_LABEL_CHARS} characters, got {size}")
        if label != label.strip():
            raise ValueError(f"{name}: expected no leading or trailing whitespace")
        bad = next((c for c in label if not _label_char(c)), None)
        if bad is not None:
            shown = f" {bad!r}" if quote else f" (Unicode category {unicodedata.category(bad)})"
            allowed = "".join(sorted(LABEL_PUNCTUATION))
            raise ValueError(f"{name}: a character{shown} outside letters, digits, symbols and {allowed!r}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"{what}: expected distinct labels, found {len(labels) - len(set(labels))} repeated")
    return list(labels)


def _label_char(c: str) -> bool:
    return c in LABEL_PUNCTUATION or unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) == "So"


def check_trainable(method: str) -> str:
    """A method the trainer trains (the registry's trains_on names a kind); the others are served from uploads only."""
    if not REGISTRY[method].trains_on:
        raise ValueError(
            f"training {method} is not supported yet: train it with PEFT and upload the adapter directory "
            "(PUT /v1/tasks/{task})"
        )
    return method


class SweepGrid(BaseModel):
    """A grid of training runs over one job's data: every combination of the listed methods, learning rates, prompt
    lengths, reparametrisations, poolings and prefix starts (an omitted axis keeps the job's value, or the method's
    default). Each run is evaluated through the serving engine on its validation split (carved from the training
    data); the best there is published, and the dev set only reported."""

    methods: list[MethodName] | None = Field(None, min_length=1, max_length=len(METHODS))
    lrs: list[float] | None = Field(None, min_length=1, max_length=16)
    num_virtual_tokens: list[int] | None = Field(None, min_length=1, max_length=16)
    reparam: list[bool] | None = Field(None, min_length=1, max_length=2, description="with and without the MLP")
    pooling: list[Literal["pooler", "cls", "mean", "last_token"]] | None = Field(None, min_length=1, max_length=4)
    prefix_init: list[Literal["activations", "random"]] | None = Field(None, min_length=1, max_length=2)
    parallel: int = Field(
        1,
        ge=1,
        le=16,
        description="runs trained at once (processes sharing the machine's cores); capped at the cores the worker may "
        "use, the effective value reported in the job's progress and result",
    )

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [check_trainable(m) for m in v]

    @model_validator(mode="after")
    def _size(self) -> SweepGrid:
        n = len(self.methods or [0]) * len(self.lrs or [0]) * len(self.num_virtual_tokens or [0])
        n *= len(self.reparam or [0]) * len(self.pooling or [0]) * len(self.prefix_init or [0])
        if n > 64:
            raise ValueError(f"sweep: expected at most 64 runs, the grid has {n}")
        if any(not 0 < lr <= 10 for lr in self.lrs or []):
            raise ValueError("sweep lrs: expected values in (0, 10]")
        if any(not 1 <= p <= 512 for p in self.num_virtual_tokens or []):
            raise ValueError("sweep num_virtual_tokens: expected values in [1, 512]")
        return self


class TrainSpec(BaseModel):
    task: str = Field(description="task name to publish under", examples=["sst2"])
    method: MethodName = Field(description=described())
    data: str | None = Field(
        None,
        max_length=4096,
        description="training file (JSONL, CSV, TSV) or image folder on the trainer's machine; through the queue, an "
        "absolute path inside PREFIXSERVE_TRAIN_DATA_DIRS",
    )
    examples: list[dict[str, Any]] | None = Field(None, max_length=100_000, description="inline training records")
    dev_data: str | None = Field(
        None, max_length=4096, description="dev file (same rules as data); default: hold out dev_fraction of train"
    )
    dev_examples: list[dict[str, Any]] | None = Field(None, max_length=100_000)
    columns: dict[str, str] | None = Field(
        None, max_length=8, description='column mapping, e.g. {"input": "mr", "output": "ref"}'
    )
    limit: int | None = Field(None, ge=1, description="read at most this many training records")
    dev_limit: int | None = Field(500, ge=1, description="evaluate on at most this many dev examples")
    dev_fraction: float = Field(
        0.1, gt=0, lt=1, description="without a dev set: the fraction of the training data held out to report on"
    )
    val_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="the validation split, carved from the training data (seeded; stratified by label): early "
        "stopping, the best checkpoint, a sweep's choice and the degeneracy guard read it, never the dev set; 0: none "
        "(the last evaluation's version is kept)",
    )
    val_max: int = Field(1000, ge=1, le=100_000, description="at most this many validation examples")
    labels: list[str] | None = Field(
        None,
        max_length=MAX_LABELS,
        description=f"class names in head order (default: sorted labels); each 1-{MAX_LABEL_CHARS} characters of "
        "letters, digits, symbols and ' _-.,&+()/!?'",
    )

    num_virtual_tokens: int | None = Field(None, ge=1, le=512, description="default: the method's")
    reparam: bool | None = Field(
        None,
        description="train through a reparametrisation: key/values through an MLP (Prefix-Tuning), a soft prompt "
        "through the prompt encoder (P-Tuning); default: the method's",
    )
    reparam_hidden: int = Field(512, ge=8, le=8192)
    prompt_encoder: Literal["lstm", "mlp"] = "lstm"
    init_text: str | None = Field(
        None,
        max_length=10_000,
        description="prompt tuning: initialise from this text's embeddings; P-Tuning v2: from its keys/values",
    )
    prefix_init: Literal["activations", "random"] | None = Field(
        None,
        description="key/value prefixes: start from real tokens (init_text, else tokens drawn from the training "
        "inputs; Li & Liang sec. 7.2): free key/values from the backbone's keys/values of those tokens, the MLP "
        "reparametrisation's input from their embeddings; or random (N(0, 1), as PEFT does); default: activations "
        "for free key/values, random through the MLP",
    )
    lora_r: int | None = Field(None, ge=1, le=4096, description="lora: the rank of each update; default: the method's")
    lora_alpha: float | None = Field(
        None, gt=0, le=1e6, description="lora: each update is scaled by lora_alpha / lora_r; default: the method's"
    )
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="lora, ia3: the projections adapted, named as PEFT's target_modules name them (a module path or "
        f"its last parts, e.g. q_proj or self_attn.v_proj), or [{ALL_LINEAR!r}] for every projection of the body; "
        "default: PEFT's for the backbone's family (lora: the attention's query and value projections; ia3: keys, "
        "values and the MLP's down projection)",
    )
    feedforward_modules: list[str] | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="ia3: those of target_modules whose input is scaled (PEFT's feedforward_modules; the others' "
        "output is); default: the family's MLP down projection",
    )

    steps: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="stop after this many optimizer steps; default: 200 when neither epochs nor max_time is given",
    )
    epochs: float | None = Field(None, gt=0, le=10_000, description="stop after this many passes over the train split")
    max_time: float | None = Field(
        None,
        gt=0,
        le=30 * 86_400,
        description="train for at most this many seconds, evaluations included: the run stops when one more step "
        "and its closing evaluation (each timed as the slowest of the last ten) would no longer fit",
    )
    batch_size: int = Field(16, ge=1, le=4096)
    grad_accum: int = Field(1, ge=1, le=1024)
    lr: float | None = Field(None, gt=0, le=10, description="default: the method's")
    weight_decay: float = Field(0.0, ge=0, le=1)
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="default: the method's")
    lr_schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear",
        description="after the linear warm-up: linear or cosine decay to 0 at the first budget (steps, epochs or "
        "max_time, whichever is nearer), or constant",
    )
    max_length: int = Field(128, ge=4, le=8192, description="truncate inputs (and targets) to this many tokens")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="generation length at evaluation")
    eval_every: int = Field(50, ge=1, le=10_000_000, description="evaluate on the validation split every N steps")
    patience: int = Field(
        5, ge=1, le=100_000, description="stop after this many evaluations without improvement (by more than min_delta)"
    )
    min_delta: float = Field(0.0, ge=0, le=1, description="the least rise of the validation metric that counts")
    checkpoint_every: int = Field(50, ge=1, le=10_000_000)
    seed: int = Field(0, ge=0)
    gate: float | None = Field(None, description="publish only if the best dev metric reaches this")
    publish_degenerate: bool = Field(
        False,
        description="publish even a run whose best validation accuracy does not beat the majority class by more than "
        "the sampling noise (2 standard errors), or whose loss did not fall (by default such a run is reported and "
        "not published)",
    )
    pooling: Literal["pooler", "cls", "mean", "last_token"] | None = Field(
        None, description="what the classification head reads; default: what the backbone was trained with"
    )
    template: str | None = Field(
        None,
        max_length=1000,
        description='how the task writes its input, with {text} (and {text_pair}); "{text} [MASK]" is a null prompt',
    )
    verbalizer: dict[str, str] | None = Field(
        None,
        max_length=256,
        description="label -> one vocabulary word, read at [MASK] by the masked-LM head instead of a linear head",
    )
    sweep: SweepGrid | None = Field(None, description="train a grid of runs and publish the best (see SweepGrid)")
    export_peft: str | None = Field(
        None,
        max_length=4096,
        description="also write a PEFT adapter directory here; through the queue, an absolute path inside "
        "PREFIXSERVE_EXPORT_DIRS (none by default: refused)",
    )

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        return validate_task_name(v)

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        return check_trainable(v)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else check_label_names(v, "labels", quote=True)

    @field_validator("target_modules", "feedforward_modules")
    @classmethod
    def _modules(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        every = info.field_name == "target_modules"  # all-linear picks targets; which scale their input is named
        for name in v or []:
            if len(name) > 200 or not (MODULE_NAME.fullmatch(name) or (every and name == ALL_LINEAR)):
                also = f", or {ALL_LINEAR!r}" if every else ""
                raise ValueError(f"{info.field_name} {name!r:.80}: expected dotted module names{also}")
        if v is not None and ALL_LINEAR in v and len(v) > 1:
            raise ValueError(f"target_modules: {ALL_LINEAR!r} names every projection, give it alone")
        return v

    @field_validator("verbalizer")
    @classmethod
    def _verbalizer(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None:
            check_label_names(list(v), "verbalizer labels", quote=True)
        return v

    @model_validator(mode="after")
    def _data(self) -> TrainSpec:
        if (self.data is None) == (self.examples is None):
            raise ValueError("give exactly one of 'data' (a file) and 'examples' (inline records)")
        if self.dev_data is not None and self.dev_examples is not None:
            raise ValueError("give at most one of 'dev_data' and 'dev_examples'")
        if self.template is not None:
            try:
                check_template(self.template)
            except ArtifactError as e:
                raise ValueError(str(e)) from None
        if self.verbalizer is not None and self.pooling is not None:
            raise ValueError("a verbalizer reads [MASK]: give no pooling with it")
        return self


@dataclass(frozen=True)
class Claimed:
    message_id: str
    job_id: str
    deliveries: int  # how many times the message has been handed out, this time included
    reclaimed: bool  # taken over from a worker that went silent


# Scripts on one job hash (KEYS[1]); each returns false when the job does not exist, so none recreates an expired one.
_START = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
if state ~= 'queued' and state ~= 'running' then return {0, state} end
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[1], 'attempts', ARGV[2], 'updated_at', ARGV[3])
return {1, state}
"""
# ARGV: new state, now, expires_at, ttl seconds, then field/value pairs. A job that already ended (a cancel came
# first) keeps its state; the worker's letting go is recorded as released_at.
_FINISH = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
local done = 0
if state == 'queued' or state == 'running' then
  redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated_at', ARGV[2], 'ended_at', ARGV[2], 'expires_at', ARGV[3])
  for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  done = 1
else
  redis.call('HSET', KEYS[1], 'released_at', ARGV[2])
end
redis.call('HDEL', KEYS[1], 'examples')
if done == 1 or redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
return {done, state}
"""
# ARGV: now, expires_at, ttl seconds.
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
if state ~= 'queued' and state ~= 'running' then return {0, state} end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'updated_at', ARGV[1], 'ended_at', ARGV[1], 'cancelled_at',
           ARGV[1], 'expires_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'examples')
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, state}
"""
_PROGRESS = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'progress', ARGV[1], 'updated_at', ARGV[2])
return 1
"""


WORKER_SEEN_S = 30.0  # a worker not seen for this long no longer counts as alive (JobQueue.workers_alive)


class JobQueue:
    """The queue and the jobs' records. `ttl_s`: how long an ended job's record is kept (PREFIXSERVE_JOB_TTL_S)."""

    def __init__(self, client: Client, *, namespace: str = "prefixserve", ttl_s: int = DEFAULT_TTL_S) -> None:
        keys = KeyLayout(namespace)
        self.client = client
        self.stream = keys.jobs
        self.prefix = keys.job_prefix
        self.workers = keys.jobs + ":workers"  # sorted set: worker name -> when it was last seen (unix seconds)
        self.index = keys.jobs + ":index"  # sorted set: job id -> when it was queued (unix seconds)
        self.ttl_s = int(ttl_s)
        self._start = register_script(client, _START)
        self._finish = register_script(client, _FINISH)
        self._cancel = register_script(client, _CANCEL)
        self._progress = register_script(client, _PROGRESS)

    async def enqueue(self, spec: dict[str, Any]) -> str:
        """Queues a job; its inline examples are kept apart from the spec (a job's view never reads them)."""
        job_id = uuid.uuid4().hex
        now = _now()
        light = {k: v for k, v in spec.items() if k not in INLINE}
        inline = {k: spec[k] for k in INLINE if spec.get(k) is not None}
        record: dict[str, Any] = {
            "state": "queued",
            "spec": json.dumps(light),
            "attempts": 0,
            "created_at": now,
            "updated_at": now,
            "inline_examples": len(inline.get("examples") or []),
            "inline_dev_examples": len(inline.get("dev_examples") or []),
        }
        if inline:
            record["examples"] = json.dumps(inline)
        try:
            async with refresh_slots_on_fault(self.client), self.client.pipeline(transaction=True) as pipe:
                pipe.hset(self.prefix + job_id, mapping=record)
                pipe.xadd(self.stream, {"job": job_id})
                pipe.zadd(self.index, {job_id: time.time()})
                pipe.zremrangebyrank(self.index, 0, -MAX_JOB_INDEX - 1)  # only the newest are listed
                await pipe.execute()
        except TRANSIENT as e:
            raise StoreUnavailable(f"Redis unreachable, job not queued: {e}") from e
        except ResponseError as e:  # e.g. the slot moved by a failover under the MULTI: EXECABORT, then MOVED
            raise StoreUnavailable(f"Redis refused the job, not queued: {e}") from e
        return job_id

    async def get(self, job_id: str) -> dict[str, Any]:
        """The job's view: every field but its inline examples (counted in inline_examples, inline_dev_examples)."""
        check_job_id(job_id)
        values: list[bytes | None] = await self._call(reply(self.client.hmget(self.prefix + job_id, list(VIEW_FIELDS))))
        job: dict[str, Any] = {k: v.decode() for k, v in zip(VIEW_FIELDS, values, strict=True) if v is not None}
        if "state" not in job:
            raise JobNotFound(f"training job {job_id!r} not found")
        for key in _JSON_FIELDS:
            if key in job:
                job[key] = json.loads(job[key])
        spec = job.get("spec") or {}
        for key in INLINE:  # a record queued by an earlier release keeps its examples in the spec
            if isinstance(spec.get(key), list):
                job.setdefault(f"inline_{key}", len(spec.pop(key)))
        for key in ("attempts", "inline_examples", "inline_dev_examples"):
            job[key] = int(job.get(key, 0))
        job["job_id"] = job_id
        return job

    async def recent(self, offset: int = 0, limit: int = 20) -> tuple[list[dict[str, Any]], int]:
        """A page of jobs, newest first (their views, as `get`), and how many the index holds. Ids whose record
        has expired are dropped from the index here, so a page may hold fewer than `limit`."""
        ids: list[bytes] = await self._call(reply(self.client.zrevrange(self.index, offset, offset + limit - 1)))
        jobs, gone = [], []
        for raw in ids:
            try:
                jobs.append(await self.get(raw.decode()))
            except JobNotFound:
                gone.append(raw)
        if gone:
            await self._call(reply(self.client.zrem(self.index, *gone)))
        total: int = await self._call(reply(self.client.zcard(self.index)))
        return jobs, int(total)

    async def spec(self, job_id: str) -> dict[str, Any]:
        """The whole spec, inline examples included (what a worker trains on)."""
        check_job_id(job_id)
        fields = await self._call(reply(self.client.hmget(self.prefix + job_id, ["spec", "examples"])))
        raw_spec: bytes | None = fields[0]
        raw_examples: bytes | None = fields[1]
        if raw_spec is None:
            raise JobNotFound(f"training job {job_id!r} not found")
        spec: dict[str, Any] = json.loads(raw_spec)
        if raw_examples is not None:
            spec.update(json.loads(raw_examples))
        return spec

    async def state(self, job_id: str) -> str | None:
        raw: bytes | None = await self._call(reply(self.client.hget(self.prefix + job_id, "state")))
        return None if raw is None else raw.decode()

    async def update(self, job_id: str, **fields: Any) -> None:
        data = {k: json.dumps(v) if k in _JSON_FIELDS else v for k, v in fields.items() if v is not None}
        await reply(self.client.hset(self.prefix + job_id, mapping={**data, "updated_at": _now()}))

    async def start(self, job_id: str, worker: str, attempts: int) -> bool:
        """Marks the job running on `worker`, only if it is queued (or running: taken over from a silent worker).
        False when it is gone or has ended (cancelled before it started): then it must not run."""
        res = await self._call(self._start(keys=[self.prefix + job_id], args=[worker, attempts, _now()]))
        return bool(res and int(res[0]))

    async def finish(
        self, job_id: str, state: Literal["succeeded", "failed"], *, result: Any = None, error: str | None = None
    ) -> bool:
        """Ends a queued or running job with its result or error, drops its inline examples and starts its TTL.
        False when the job was gone or had already ended (cancelled while it ran): its state is left as it is."""
        now = datetime.now(UTC)
        extra: list[str] = []
        if result is not None:
            extra += ["result", json.dumps(result)]
        if error is not None:
            extra += ["error", error]
        args: list[str | int] = [state, _iso(now), _iso(now + timedelta(seconds=self.ttl_s)), self.ttl_s, *extra]
        res = await self._call(self._finish(keys=[self.prefix + job_id], args=args))
        return bool(res and int(res[0]))

    async def cancel(self, job_id: str) -> str:
        """Cancels a queued or running job (a worker stops it at its next step and publishes nothing) and returns the
        state it had. Raises JobNotFound, or JobEnded when it has already succeeded, failed or been cancelled."""
        check_job_id(job_id)
        now = datetime.now(UTC)
        args: list[str | int] = [_iso(now), _iso(now + timedelta(seconds=self.ttl_s)), self.ttl_s]
        res = await self._call(self._cancel(keys=[self.prefix + job_id], args=args))
        if not res:
            raise JobNotFound(f"training job {job_id!r} not found")
        done = int(res[0])
        state: str = res[1].decode()
        if not done:
            raise JobEnded(f"training job {job_id!r} already {state}: only a queued or running job can be cancelled")
        return state

    async def progress(self, job_id: str, progress: dict[str, Any]) -> None:
        """Writes the job's progress while it runs (never after it ended: a cancelled job keeps its last progress)."""
        await self._call(self._progress(keys=[self.prefix + job_id], args=[json.dumps(progress), _now()]))

    # -- consumers ----------------------------------------------------------------------------------------------
    async def ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def claim(self, consumer: str, *, idle_ms: int, block_ms: int = 1000) -> Claimed | None:
        """A message silent for idle_ms (its worker died), else a new one (waiting up to block_ms), else None."""
        _, messages, *_ = await self.client.xautoclaim(self.stream, GROUP, consumer, idle_ms, "0-0", count=1)
        reclaimed = bool(messages)
        if not messages:
            res = await self.client.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=1, block=block_ms)
            messages = res[0][1] if res else []
        if not messages:
            return None
        msg_id, fields = messages[0]
        msg_id = msg_id.decode()
        pending = await self.client.xpending_range(self.stream, GROUP, min=msg_id, max=msg_id, count=1)
        deliveries = int(pending[0]["times_delivered"]) if pending else 1
        return Claimed(msg_id, fields[b"job"].decode(), deliveries, reclaimed)

    async def heartbeat(self, consumer: str, message_id: str) -> None:
        """Resets the message's idle time, so no other worker takes it while this one is alive."""
        await self.client.xclaim(self.stream, GROUP, consumer, 0, [message_id], justid=True)

    async def worker_seen(self, consumer: str) -> None:
        """Notes that worker `consumer` is alive now, whether it waits for a job or trains one (see workers_alive).
        Workers unseen for a day are forgotten, and the set expires a day after the last worker's note."""
        now = time.time()
        async with refresh_slots_on_fault(self.client), self.client.pipeline(transaction=True) as pipe:
            pipe.zadd(self.workers, {consumer: now})
            pipe.zremrangebyscore(self.workers, "-inf", now - 86_400)
            pipe.expire(self.workers, 86_400)
            await pipe.execute()

    async def worker_gone(self, consumer: str) -> None:
        await reply(self.client.zrem(self.workers, consumer))

    async def workers_alive(self, within_s: float = WORKER_SEEN_S) -> int:
        """How many workers noted themselves alive within `within_s` seconds (a worker does every heartbeat_s, 5 s
        by default; the window leaves room for that and for clocks a few seconds apart). 0: nobody consumes the
        queue, and a queued job waits until a worker starts."""
        count: int = await self._call(reply(self.client.zcount(self.workers, time.time() - within_s, "+inf")))
        return int(count)

    async def ack(self, message_id: str) -> None:
        """Acknowledges the message and deletes it from the stream, which would otherwise grow with every job."""
        async with refresh_slots_on_fault(self.client), self.client.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, GROUP, message_id)
            pipe.xdel(self.stream, message_id)
            await pipe.execute()

    @staticmethod
    async def _call(call: Awaitable[T]) -> T:
        try:
            return await call
        except TRANSIENT as e:
            raise StoreUnavailable(f"Redis unreachable: {e}") from e
        except ResponseError as e:
            raise StoreUnavailable(f"Redis refused the job command: {e}") from e


def _now() -> str:
    return _iso(datetime.now(UTC))


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


__all__ = [
    "ACTIVE",
    "ENDED",
    "Claimed",
    "JobEnded",
    "JobNotFound",
    "JobPathError",
    "JobQueue",
    "PathNotAllowed",
    "SweepGrid",
    "TrainSpec",
    "allowed_path",
    "check_job_id",
    "check_job_paths",
    "check_label_names",
]
