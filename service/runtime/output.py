"""Output assembly: a generation row's text and stop conditions, and the final results of both request kinds.

TextStream runs on the engine's thread, one per generation row: it decides when the row stops (a stop token, EOS, the
length limit, a stop string) and detokenises incrementally. The result builders run where a request's outputs are
collected (the scheduler's handles).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from prefix_store import PrefixArtifact

from .sampling import SamplingParams
from .step import FinishReason, RowOutput


class TextStream:
    """One generation row's output tokens and text.

    Stop strings: the whole output is decoded, cut at the first stop string, and a tail that could still grow into
    one (or an incomplete multi-byte character) is held back until it cannot. Decoding the whole output each step is
    quadratic in its length; fine at hundreds of tokens.

    Args:
        tokenizer: decodes ids to text; None (tests, benchmarks) yields no text.
        params: the row's stop strings, stop token ids, length limit and ignore_eos.
        eos_ids: the backbone's end-of-sequence ids.
    """

    def __init__(self, tokenizer: Any, params: SamplingParams, eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
        self.token_ids: list[int] = []
        self.emitted = 0  # characters of the decoded output already handed out

    def push(self, token_id: int) -> tuple[str, FinishReason | None]:
        """Appends a token; returns the new text and the finish reason if the row ends with it."""
        self.token_ids.append(token_id)
        finish = None
        if token_id in self.stop_ids:
            finish = FinishReason.STOP
        elif len(self.token_ids) >= self.params.max_new_tokens:
            finish = FinishReason.LENGTH
        if self.tokenizer is None:
            return "", finish
        ids = self.token_ids[:-1] if finish is FinishReason.STOP else self.token_ids  # the stop token is no text
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        stops = self.params.stop
        if stops:
            hits = [text.find(s, max(0, self.emitted - len(s))) for s in stops]
            cuts = [h for h in hits if h >= 0]
            if cuts:
                text, finish = text[: min(cuts)], FinishReason.STOP
        end = len(text)
        if finish is None:
            if text.endswith("\ufffd"):
                end -= 1
            hold = max((len(s) - 1 for s in stops), default=0)
            end = max(self.emitted, end - hold)
        delta, self.emitted = text[self.emitted : end], max(self.emitted, end)
        return delta, finish


@dataclass
class GenerationResult:
    task: str | None
    version: int | None
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: (id, log-probability), most likely first
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None  # RowOutput.prompt_logprobs

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class ClassificationResult:
    task: str
    version: int
    label: str
    scores: dict[str, float]  # label -> probability


@dataclass
class EmbeddingResult:
    task: str | None  # None: the bare backbone
    version: int | None
    embedding: list[float]  # (hidden,), unit length
    prompt_tokens: int


def class_probabilities(logits: torch.Tensor) -> list[float]:
    """Head logits (C,) -> probabilities, in label order."""
    return torch.softmax(logits.float(), dim=-1).tolist()


def generation_result(
    task: str | None, version: int | None, prompt_tokens: int, outputs: Iterable[RowOutput], logprobs: bool
) -> GenerationResult:
    tokens: list[int] = []
    texts: list[str] = []
    lps: list[float] = []  # the engine sets a token's logprob (top_logprobs) on every token row that asked for it
    tops: list[list[tuple[int, float]]] = []
    last: RowOutput | None = None
    prompt_lps = None
    for out in outputs:
        last = out
        prompt_lps = prompt_lps or out.prompt_logprobs
        if out.token_id is not None:
            tokens.append(out.token_id)
            if out.logprob is not None:
                lps.append(out.logprob)
            if out.top_logprobs is not None:
                tops.append(out.top_logprobs)
        texts.append(out.text)
    assert last is not None and last.finish_reason is not None, "a finished request has a last output"
    assert not logprobs or len(lps) == len(tokens), "every token of a logprobs request carries its log-probability"
    return GenerationResult(
        task,
        version,
        tokens,
        "".join(texts),
        last.finish_reason.value,
        prompt_tokens,
        lps if logprobs else None,
        tops if tops else None,
        prompt_lps,
    )


def classification_result(task: str, version: int, labels: list[str], output: RowOutput) -> ClassificationResult:
    assert output.probs is not None, "a classification row's output carries its probabilities"
    scores = dict(zip(labels, output.probs, strict=True))
    return ClassificationResult(task, version, max(scores, key=scores.__getitem__), scores)


def embedding_result(artifact: PrefixArtifact | None, prompt_tokens: int, output: RowOutput) -> EmbeddingResult:
    assert output.embedding is not None, "an embedding row's output carries its embedding"
    task, version = (None, None) if artifact is None else (artifact.task, artifact.version)
    return EmbeddingResult(task, version, output.embedding.tolist(), prompt_tokens)
