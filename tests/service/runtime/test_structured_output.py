"""Structured output inside a mixed batch: rows constrained by a JSON schema or to any JSON object share the batch
with free rows of other tasks; the constrained outputs parse and satisfy their schema, every row gives what it gives
alone, and a bad schema is refused by name. The engine is driven directly (no Redis)."""

from __future__ import annotations

import copy
import json

import pytest
from peft import PrefixTuningConfig

from service.runtime import EngineRequest, SamplingParams
from service.runtime.grammar import Grammars, InvalidGrammar
from tests.engine_harness import engine_for, generate, import_peft, trained_peft
from tests.models import BYTE_EOS, byte_tokenizer, tiny_model

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["ok", "n", "color"],
    "additionalProperties": False,
}


def valid(obj: object) -> bool:
    """SCHEMA checked by hand (no validator library in the lock)."""
    return (
        isinstance(obj, dict)
        and set(obj) == {"ok", "n", "color"}
        and isinstance(obj["ok"], bool)
        and isinstance(obj["n"], int)
        and not isinstance(obj["n"], bool)
        and 0 <= obj["n"] <= 99
        and obj["color"] in ("red", "green", "blue")
    )


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama-bytes")


def test_constrained_and_free_rows_mixed(model, tmp_path):
    pm = trained_peft(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), seed=3)
    art = import_peft(pm, "t", model.config, tmp_path / "t")
    tok = byte_tokenizer()
    grammars = Grammars(tok, model.config.vocab_size)
    schema = grammars.compile({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    anything = grammars.compile({"type": "json_object"})
    prompt = tok("Answer in JSON: ")["input_ids"]
    rows = [
        ("t", SamplingParams(max_new_tokens=60, grammar=schema)),
        (None, SamplingParams(max_new_tokens=60, temperature=1.0, seed=5, grammar=schema)),
        ("t", SamplingParams(max_new_tokens=20, temperature=1.0, seed=6)),  # free
        (None, SamplingParams(max_new_tokens=80, grammar=anything)),
        (None, SamplingParams(max_new_tokens=20)),  # free
    ]
    engine = engine_for(copy.deepcopy(model), tok)

    def request(i: int, rid: str) -> EngineRequest:
        task, params = rows[i]
        return EngineRequest.generate(rid, prompt, art if task else None, params)

    alone = [generate(engine, [request(i, f"alone{i}")])[0] for i in range(len(rows))]
    mixed = generate(engine, [request(i, f"mixed{i}") for i in range(len(rows))])
    for i, (a, m) in enumerate(zip(alone, mixed, strict=True)):
        assert a.token_ids == m.token_ids, i
    for i in (0, 1):
        assert alone[i].finish_reason == "stop" and alone[i].token_ids[-1] == BYTE_EOS, alone[i]
        assert valid(json.loads(alone[i].text)), alone[i].text
    assert alone[3].finish_reason == "stop" and isinstance(json.loads(alone[3].text), dict), alone[3].text
    free = [alone[2].text, alone[4].text]
    assert not all(_is_json(t) for t in free), "the control: unconstrained rows of this model are not JSON"


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_bad_schemas_are_refused_by_name(model):
    grammars = Grammars(byte_tokenizer(), model.config.vocab_size)
    with pytest.raises(InvalidGrammar, match="response_format"):
        grammars.compile({"type": "json_schema", "json_schema": {"schema": {"type": "object", "minProperties": "x"}}})
    with pytest.raises(InvalidGrammar, match="expected text, json_object or json_schema"):
        grammars.compile({"type": "yaml"})
    assert grammars.compile({"type": "text"}) is None
