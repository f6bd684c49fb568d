"""Structured output: a constrained row's allowed next tokens come from its grammar (llguidance, chosen by
bench/grammar_backends.py: the lowest per-step overhead of llguidance, xgrammar and outlines-core at batch 32) and
are applied to that row's logits inside the mixed batch, after the penalties and before the sampler; free rows are
untouched. JSON output is compact (no free whitespace), so a grammar cannot let a row loop on blanks.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from .errors import ServingError

MAX_CACHED_GRAMMARS = 64


class InvalidGrammar(ServingError):
    """A response format that does not compile (an unsupported or malformed JSON schema)."""


class Grammars:
    """Compiles response formats for one backbone's tokenizer and makes each constrained row's matcher.

    Args:
        tokenizer: the backbone's Hugging Face fast tokenizer (llguidance reads its vocabulary as bytes).
        vocab_size: the width of the model's logits (may exceed the tokenizer's vocabulary).
    """

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll: Any = None
        self._lock = threading.Lock()
        self._templates: dict[str, Any] = {}  # grammar -> an unused matcher, copied for each row

    @property
    def lltokenizer(self) -> Any:
        with self._lock:  # built once (about a second for a 150k vocabulary), on first use
            if self._ll is None:
                import llguidance.hf

                if self.tokenizer is None:
                    raise InvalidGrammar("response_format: the backbone has no tokenizer to constrain")
                try:
                    self._ll = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size)
                except (ValueError, RuntimeError, AttributeError, TypeError) as e:
                    msg = f"response_format: this backbone's tokenizer cannot be constrained ({e})"
                    raise InvalidGrammar(msg) from None
            return self._ll

    def compile(self, response_format: dict[str, Any]) -> str | None:
        """{"type": "text"} -> None; {"type": "json_object"}; {"type": "json_schema", "json_schema": {"schema":
        {...}}} -> an llguidance grammar. Raises InvalidGrammar naming what is wrong."""
        import llguidance

        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            schema: Any = {"type": "object"}
        elif kind == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema", {})
        else:
            raise InvalidGrammar(f"response_format.type: expected text, json_object or json_schema, got {kind!r}")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except ValueError as e:
            raise InvalidGrammar(f"response_format: {e}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.lltokenizer)
        if error:
            raise InvalidGrammar(f"response_format: the JSON schema is not supported: {error.strip()[:500]}")
        self._warm(grammar)
        return grammar

    def _warm(self, grammar: str) -> None:
        """Builds the grammar's matcher and its first mask here, on the caller's thread: the first mask of a grammar
        (and of a tokenizer) takes seconds, which the engine thread, and every row of its batch, would wait for."""
        import llguidance.torch

        template = self.matcher(grammar)
        llguidance.torch.fill_next_token_bitmask(template, llguidance.torch.allocate_token_bitmask(1, self.vocab_size))

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher for one row: a copy of a cached one per grammar (the n choices of a prompt, or many
        requests with one schema, parse it once)."""
        import llguidance

        with self._lock:
            template = self._templates.pop(grammar, None)
        if template is None:
            template = llguidance.LLMatcher(self.lltokenizer, grammar)
            if template.is_error():
                raise InvalidGrammar(f"response_format: {template.get_error()}")
        with self._lock:
            self._templates[grammar] = template  # most recently used last
            while len(self._templates) > MAX_CACHED_GRAMMARS:
                self._templates.pop(next(iter(self._templates)))
        return template.deep_copy()


def constrain(logits: torch.Tensor, matchers: list[Any]) -> torch.Tensor:
    """Masks, in place, the tokens each constrained row's grammar does not allow now: logits (B, V) float; matchers
    (B,) with None for free rows."""
    import llguidance.torch

    rows = [i for i, m in enumerate(matchers) if m is not None]
    mask = llguidance.torch.allocate_token_bitmask(len(rows), logits.shape[-1])  # (n, ceil(V / 32)) int32, CPU
    for j, i in enumerate(rows):
        llguidance.torch.fill_next_token_bitmask(matchers[i], mask, j)
    sub = logits[rows]
    llguidance.torch.apply_token_bitmask_inplace(sub, mask.to(logits.device, non_blocking=True))
    logits[rows] = sub
    return logits


def advance(matchers: list[Any], tokens: list[int]) -> None:
    """Each constrained row's matcher takes the token its row drew."""
    for m, t in zip(matchers, tokens, strict=True):
        if m is not None and not m.is_stopped():
            m.consume_token(t)
