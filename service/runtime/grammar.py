"""Structured output: a constrained row's allowed next tokens come from its grammar (llguidance, chosen by
bench/grammar_backends.py: the lowest per-step overhead of llguidance, xgrammar and outlines-core at batch 32) and
are applied to that row's logits inside the mixed batch, after the penalties and before the sampler; free rows are
untouched. JSON output is compact (no free whitespace), so a grammar cannot let a row loop on blanks.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, TypedDict

import torch

from .errors import ServingError
from .memory import rss_bytes, trim


class ParserLimits(TypedDict):
    """The keywords of llguidance.LLParserLimits that LIMITS sets."""

    initial_lexer_fuel: int
    step_lexer_fuel: int
    step_max_items: int
    max_lexer_states: int
    max_grammar_size: int


# What one response format may cost. The parser limits bound the work and memory of building a grammar's lexer
# and of each mask (llguidance's defaults let `{"pattern": "^(a{1000}){1000}$"}` take 200 MB at its first mask);
# the compile budgets are checked around the first mask, where a grammar's cost shows.
LIMITS = ParserLimits(
    initial_lexer_fuel=50_000,  # ~1 ms of regex analysis up front
    step_lexer_fuel=50_000,  # per mask
    step_max_items=20_000,  # Earley items per mask
    max_lexer_states=10_000,  # about 1-2 kB each (a 60-field schema with patterns, dates and enums needs < 2,000)
    max_grammar_size=100_000,  # symbols in the grammar's productions (a schema of 10,000 properties exceeds it)
)
COMPILE_BUDGET_S = 2.0  # compiling a schema and computing its first mask
MEMORY_BUDGET = 32 * 1024**2  # what compiling one schema may grow the process by
CACHE_BYTES = 16 * 1024**2  # compiled grammars kept for reuse, by their measured cost (a plain schema: ~1 MiB)
MAX_SCHEMA_NODES = 2_000  # objects, arrays and values in a schema, counted before anything compiles


class InvalidGrammar(ServingError):
    """A response format that does not compile (an unsupported or malformed JSON schema, or one past the limits)."""


@dataclass
class _Compiled:
    template: Any  # an unused matcher, copied for each row
    cost: int  # bytes it was measured to take when it compiled


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
        self._limits: Any = None
        self._lock = threading.Lock()
        self._compiled: OrderedDict[str, _Compiled] = OrderedDict()  # grammar -> matcher, least recently used first
        self.cached_bytes = 0

    @property
    def lltokenizer(self) -> Any:
        with self._lock:  # built once (about a second for a 150k vocabulary), on first use or at warm_up
            if self._ll is None:
                import llguidance
                import llguidance.hf

                if self.tokenizer is None:
                    raise InvalidGrammar("response_format: the backbone has no tokenizer to constrain")
                try:
                    self._ll = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size)
                except (ValueError, RuntimeError, AttributeError, TypeError) as e:
                    msg = f"response_format: this backbone's tokenizer cannot be constrained ({e})"
                    raise InvalidGrammar(msg) from None
                self._limits = llguidance.LLParserLimits(**LIMITS, verbose_errors=False)
            return self._ll

    def warm_up(self) -> None:
        """Builds the tokenizer's tables and compiles a trivial schema, so the first structured request after a
        start does not pay for them."""
        self.compile({"type": "json_object"})

    def compile(self, response_format: dict[str, Any]) -> str | None:
        """{"type": "text"} -> None; {"type": "json_object"}; {"type": "json_schema", "json_schema": {"schema":
        {...}}} -> an llguidance grammar. Raises InvalidGrammar naming what is wrong or which limit it passed."""
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
        check_size(schema)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except ValueError as e:
            raise InvalidGrammar(f"response_format: {str(e)[:500]}") from None
        ll = self.lltokenizer
        error = llguidance.LLMatcher.validate_grammar(grammar, ll, limits=self._limits)
        if error:
            raise InvalidGrammar(f"response_format: the JSON schema is not supported: {error.strip()[:500]}")
        with self._lock:
            if grammar in self._compiled:
                self._compiled.move_to_end(grammar)
                return grammar
        self._warm(grammar)
        return grammar

    def _warm(self, grammar: str) -> None:
        """Builds the grammar's matcher and its first mask here, on the caller's thread (the first mask of a
        grammar takes up to seconds, which the engine thread, and every row of its batch, would otherwise wait for),
        within the compile budgets; a matcher already in error is refused here, before any row generates with it."""
        import llguidance
        import llguidance.torch

        trim()  # freed pages go back first, so the growth measured below is this grammar's, not reused memory
        before, started = rss_bytes(), time.monotonic()
        template = llguidance.LLMatcher(self.lltokenizer, grammar, limits=self._limits)
        llguidance.torch.fill_next_token_bitmask(template, llguidance.torch.allocate_token_bitmask(1, self.vocab_size))
        took, grew = time.monotonic() - started, rss_bytes() - before
        if template.is_error():
            raise InvalidGrammar(f"response_format: the JSON schema cannot be matched: {_error(template)}")
        if took > COMPILE_BUDGET_S:
            raise InvalidGrammar(
                f"response_format: compiling the JSON schema took {took:.1f}s, past the limit of {COMPILE_BUDGET_S:g}s"
            )
        if grew > MEMORY_BUDGET:
            raise InvalidGrammar(
                f"response_format: compiling the JSON schema took {grew >> 20} MiB, past the limit of "
                f"{MEMORY_BUDGET >> 20} MiB"
            )
        self._keep(grammar, _Compiled(template, max(grew, len(grammar) * 8, 1024**2)))

    def _keep(self, grammar: str, compiled: _Compiled) -> None:
        """Caches a compiled grammar, evicting the least recently used ones past CACHE_BYTES (by measured cost)."""
        with self._lock:
            old = self._compiled.pop(grammar, None)
            self.cached_bytes -= old.cost if old is not None else 0
            self._compiled[grammar] = compiled
            self.cached_bytes += compiled.cost
            while self.cached_bytes > CACHE_BYTES and len(self._compiled) > 1:
                _, evicted = self._compiled.popitem(last=False)
                self.cached_bytes -= evicted.cost

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher for one row: a copy of the cached one (the n choices of a prompt, or many requests with
        one schema, compile it once); a grammar evicted since it compiled is compiled again."""
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
        if compiled is None:
            self._warm(grammar)
            with self._lock:
                compiled = self._compiled[grammar]
        return compiled.template.deep_copy()


def apply_bitmask(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """-inf, in place, wherever the bitmask disallows a token: logits (n, V) float, mask (n, ceil(V / 32)) int32
    with bit b of word w set when token 32 w + b is allowed. Eager torch: llguidance's own helper is torch.compile'd,
    and compiling it on the engine thread stalled every row of the batch for seconds at the first structured
    request."""
    n, V = logits.shape
    shifts = torch.arange(32, dtype=torch.int32, device=mask.device)
    allowed = ((mask[:, :, None] >> shifts) & 1).reshape(n, -1)[:, :V].bool()  # (n, 32 * words) -> (n, V)
    logits[:, : allowed.shape[1]].masked_fill_(~allowed, float("-inf"))
    logits[:, allowed.shape[1] :] = float("-inf")  # beyond the mask's words: never allowed


def check_size(schema: Any) -> None:
    """Refuses a schema past MAX_SCHEMA_NODES at once (a cheap walk that stops at the limit): what a request's
    handler runs before queuing the compile."""
    if _count_nodes(schema, MAX_SCHEMA_NODES) > MAX_SCHEMA_NODES:
        raise InvalidGrammar(
            f"response_format: the JSON schema has more than {MAX_SCHEMA_NODES} nodes (objects, arrays, values); "
            "the server compiles schemas up to that limit"
        )


def _count_nodes(value: Any, limit: int) -> int:
    """The JSON nodes in `value`, counting stops a little past `limit` (a cheap walk, before any compiling)."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.values())
            count += len(item)  # the keys
        elif isinstance(item, list):
            stack.extend(item)
    return count


def _error(matcher: Any) -> str:
    return (matcher.get_error() or "unknown error").strip().splitlines()[0][:300]


def constrain(logits: torch.Tensor, matchers: list[Any]) -> dict[int, InvalidGrammar]:
    """Masks, in place, the tokens each constrained row's grammar does not allow now: logits (B, V) float; matchers
    (B,) with None for free rows. Returns the rows whose matcher failed (a limit passed mid-output), with the
    error that ends them: their mask means nothing, so they must not emit a token as if the grammar had ended."""
    import llguidance.torch

    rows = [i for i, m in enumerate(matchers) if m is not None]
    mask = llguidance.torch.allocate_token_bitmask(len(rows), logits.shape[-1])  # (n, ceil(V / 32)) int32, CPU
    for j, i in enumerate(rows):
        llguidance.torch.fill_next_token_bitmask(matchers[i], mask, j)
    sub = logits[rows]
    apply_bitmask(sub, mask.to(logits.device, non_blocking=True))
    logits[rows] = sub
    return {
        i: InvalidGrammar(f"response_format: the grammar failed while generating: {_error(matchers[i])}")
        for i in rows
        if matchers[i].is_error()
    }


def advance(matchers: list[Any], tokens: list[int]) -> None:
    """Each constrained row's matcher takes the token its row drew."""
    for m, t in zip(matchers, tokens, strict=True):
        if m is not None and not m.is_stopped():
            m.consume_token(t)
