"""The step as plain data: what a caller hands the scheduler (a Submission per request), what the scheduler hands
the engine for one step, and what the engine hands back.

A step is `engine.step(StepPlan) -> StepOutput` (the shape of vLLM's SchedulerOutput / ModelRunnerOutput). The
scheduler owns the queues and decides; the engine owns the running rows and executes. Nothing is mirrored: the
scheduler learns how many rows run and how many key/value columns they reserve from the last StepOutput.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from prefix_store import PrefixArtifact

from .ready_queue import PRIORITIES
from .sampling import SamplingParams


class Kind(enum.Enum):
    GENERATE = "generate"  # decodes tokens until a stop condition
    CLASSIFY = "classify"  # one forward; the task's head reads the pooled state
    EMBED = "embed"  # one forward (encoders); the row's pooled state itself, L2-normalised


class FinishReason(enum.StrEnum):
    LENGTH = "length"
    STOP = "stop"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class Submission:
    """One request as a caller queues it (`Scheduler.submit_all`); the scheduler resolves its task, checks it and
    builds its EngineRequest, once.

    Args:
        prompt_ids: the prompt's token ids (empty with `pixel_values`).
        task: what the prompt runs through: a task name (its current version when the request is prepared, or
            `version`), a task version the caller has resolved already (run as given, not looked up again), or None:
            the bare backbone.
        params: sampling and stopping: a generation request; None: classification, or embedding with `embed`.
        embed: an embedding request (encoders): the pooled state itself, no head.
        version: with a task name, the version to run (None: the current one).
        token_type_ids: segment ids of a sentence pair (encoders).
        pixel_values: (C, H, W) the preprocessed image of an image backbone.
        client: who sent it (ready_queue: the unit of fairness within a task).
        fork_of: the index, in the same `submit_all` call, of an earlier request with the same prompt and task
            (another choice of that prompt): this one may copy its prefill (EngineRequest.group).
        priority: its admission class, "high", "normal" or "low" (ready_queue.PRIORITIES): every ready request of a
            higher class is admitted before any of a lower one.
    """

    prompt_ids: list[int]
    task: str | PrefixArtifact | None = None
    params: SamplingParams | None = None
    embed: bool = False
    version: int | None = None
    token_type_ids: list[int] | None = None
    pixel_values: torch.Tensor | None = None
    client: str = ""
    fork_of: int | None = None
    priority: str = "normal"

    def __post_init__(self) -> None:
        if self.version is not None and not isinstance(self.task, str):
            raise ValueError("a version goes with a task name (a resolved artifact is its own version)")
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority: expected one of {', '.join(PRIORITIES)}, got {self.priority!r}")

    @property
    def kind(self) -> Kind:
        return Kind.EMBED if self.embed else Kind.CLASSIFY if self.params is None else Kind.GENERATE

    @property
    def task_name(self) -> str | None:
        return self.task.task if isinstance(self.task, PrefixArtifact) else self.task


@dataclass(frozen=True)
class EngineRequest:
    """One request as the engine sees it: everything resolved, nothing left to look up.

    Args:
        request_id: unique among live requests.
        kind: GENERATE (params required), CLASSIFY (the artifact must have a head) or EMBED (encoders; any artifact,
            or none: the bare backbone's embedding).
        prompt_ids: the prompt's token ids, at least one.
        artifact: the exact task version to run; None: the bare backbone.
        params: sampling and stopping, for GENERATE.
        token_type_ids: segment ids of a sentence pair (encoders).
        pixel_values: (C, H, W) the preprocessed image of an image backbone (prompt_ids empty then).
        group: the id of a request with the same prompt and task version (another choice of the same prompt): the
            engine may copy that request's prefill instead of running this one's.
    """

    request_id: str
    kind: Kind
    prompt_ids: list[int]
    artifact: PrefixArtifact | None = None
    params: SamplingParams | None = None
    token_type_ids: list[int] | None = None
    pixel_values: torch.Tensor | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        if (self.kind is Kind.GENERATE) != (self.params is not None):
            raise ValueError(f"{self.kind.value} request {self.request_id}: params go with generation only")

    @classmethod
    def generate(
        cls, request_id: str, prompt_ids: list[int], artifact: PrefixArtifact | None, params: SamplingParams
    ) -> EngineRequest:
        return cls(request_id, Kind.GENERATE, prompt_ids, artifact, params)

    @classmethod
    def classify(
        cls,
        request_id: str,
        prompt_ids: list[int],
        artifact: PrefixArtifact | None,
        token_type_ids: list[int] | None = None,
    ) -> EngineRequest:
        return cls(request_id, Kind.CLASSIFY, prompt_ids, artifact, None, token_type_ids)

    @property
    def num_virtual_tokens(self) -> int:
        return 0 if self.artifact is None else self.artifact.num_virtual_tokens

    @property
    def reserved_tokens(self) -> int:
        """Key/value columns the request can hold at most: prefix + prompt + max new tokens."""
        new = self.params.max_new_tokens if self.params is not None else 0
        return self.num_virtual_tokens + len(self.prompt_ids) + new


@dataclass(frozen=True)
class StepPlan:
    """What the scheduler hands the engine for one step.

    admit: new requests, prefilled this step in one mixed-task forward (classification rows finish there).
    cancel: ids of running rows to drop before the step decodes (their requests were cancelled or expired).
    """

    admit: tuple[EngineRequest, ...] = ()
    cancel: frozenset[str] = frozenset()


@dataclass
class RowOutput:
    """What one step produced for one request. A generation row gets one per token, `finish_reason` set on its last;
    a classification row exactly one, with `probs`; an embedding row exactly one, with `embedding`; `error` ends a
    request that failed.

    text: new text since the row's previous output (held back while it could still become a stop string).
    logits: (V,) fp32 next-token logits with SamplingParams.return_logits; (C,) fp32 head logits when classifying.
    """

    request_id: str
    step: int
    token_id: int | None = None
    text: str = ""
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, log-probability), most likely first
    # On a row's first token, with SamplingParams.prompt_logprobs: per prompt token (None for the first), its
    # log-probability and its top_logprobs alternatives.
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    finish_reason: FinishReason | None = None
    probs: list[float] | None = None
    logits: torch.Tensor | None = None
    embedding: torch.Tensor | None = None  # (hidden,) fp32, unit length
    error: Exception | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepOutput:
    """step: the engine's step counter; rows: one RowOutput per request the step touched; running: rows still
    decoding after the step; reserved_tokens: the key/value columns they hold at most."""

    step: int
    rows: list[RowOutput] = field(default_factory=list)
    running: int = 0
    reserved_tokens: int = 0
