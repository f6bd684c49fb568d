"""The family matrix, run and reported: the helpers the matrix tests share (tests/service/runtime/test_families.py),
and the README's supported-backbone table, generated from the matrix itself.

    python -m tests.family_matrix            # runs every entry, prints the table with the measured max |dlogit|
    python -m tests.family_matrix --write    # ... and writes it into README.md between its markers

The suite checks that the README's table lists exactly what the matrix and service.runtime.families say (every
column but the measured one, which varies by machine in the last digits).
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import tempfile
from pathlib import Path

import torch

from service.runtime import Engine, EngineRequest, Kind, SamplingParams, StepPlan, families, wrap_model
from tests.families import ENCODERS, FAMILIES, encoder_model, family_model
from tests.golden.cases import STEPS, Case, backbone_of, encoder_case, family_case

CHUNK = 8  # prefill tokens per step: the 12- and 10-token prompts take two steps
README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- family-matrix:start -->", "<!-- family-matrix:end -->"


# -- running the matrix --------------------------------------------------------------------------------------------
def run_causal(case: Case, model: torch.nn.Module | None = None, chunk: int = CHUNK) -> dict[str, list]:
    """Every row of the case through one engine: rows 0-1 first, the rest joining two steps later; a fork of row 0
    ("fork", the same prompt and task, sharing its prefill). `chunk`: prefill tokens per step. Returns each request's
    outputs, by request id."""
    bb = wrap_model(model or backbone_of(case.kind), None, name=case.kind)
    engine = Engine(bb, max_rows=8, max_prefill_tokens=chunk)
    params = SamplingParams(max_new_tokens=STEPS, return_logits=True, ignore_eos=True, logprobs=True)
    echo = SamplingParams(**{**params.__dict__, "prompt_logprobs": True})

    def request(i: int, rid: str, group: str | None = None) -> EngineRequest:
        art = case.artifacts.get(case.tasks[i]) if case.tasks[i] else None
        p = echo if case.tasks[i] is None else params
        return EngineRequest(rid, Kind.GENERATE, case.inputs[i], art, p, group=group)

    first = (request(0, "r0"), request(0, "fork", group="r0"), request(1, "r1"))
    rest = tuple(request(i, f"r{i}") for i in range(2, len(case.tasks)))
    outputs = list(engine.step(StepPlan(first)).rows)
    for _ in range(2):
        outputs += engine.step(StepPlan()).rows
    assert engine.running, "the first rows are still decoding when the others join"
    outputs += engine.step(StepPlan(rest)).rows
    while engine.running:
        outputs += engine.step(StepPlan()).rows
    by_id: dict[str, list] = {}
    for out in outputs:
        assert out.error is None, f"{out.request_id}: {out.error!r}"
        by_id.setdefault(out.request_id, []).append(out)
    return by_id


def causal_differences(case: Case, got: dict[str, list], model: torch.nn.Module) -> dict[str, float]:
    """Per request, the largest |logit difference| from its reference over every step, or the largest
    |log-probability difference| where that is larger (inf when its greedy tokens differ); the bare row's echoed
    prompt log-probabilities as "<id>.prompt"."""
    diffs = {}
    for rid, outs in got.items():
        i = 0 if rid == "fork" else int(rid[1:])
        ref = case.ref_logits[i]
        if [o.token_id for o in outs] != case.ref_tokens[i]:
            diffs[rid] = float("inf")
            continue
        diffs[rid] = max((o.logits - ref[k]).abs().max().item() for k, o in enumerate(outs))
        ref_lp = torch.log_softmax(ref.float(), -1)
        lp = max(abs(o.logprob - ref_lp[k, o.token_id].item()) for k, o in enumerate(outs))
        diffs[rid] = max(diffs[rid], lp)
        if case.tasks[i] is None:  # the bare row echoes its prompt's log-probabilities
            ids = case.inputs[i]
            with torch.no_grad():
                full = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)  # (T, V)
            want = [None] + [full[j - 1, ids[j]].item() for j in range(1, len(ids))]
            have = outs[0].prompt_logprobs
            assert have[0] is None and len(have) == len(ids)
            diffs[rid + ".prompt"] = max(abs(h[0] - w) for h, w in zip(have[1:], want[1:]))
    return diffs


def encoder_differences(case: Case, model: torch.nn.Module) -> dict[str, float]:
    """Every task row (head logits) and the bare backbone's embedding ("bare", against transformers' pooled state)
    in one forward: the largest |difference| per row."""
    bb = wrap_model(copy.deepcopy(model), None, name=case.kind)
    reqs = [
        EngineRequest.classify(f"r{i}", ids, case.artifacts[t])
        for i, (t, ids) in enumerate(zip(case.tasks, case.inputs))
    ]
    bare = case.inputs[0]
    reqs.append(EngineRequest("bare", Kind.EMBED, bare))
    rows = {o.request_id: o for o in Engine(bb).step(StepPlan(tuple(reqs))).rows}
    diffs = {t: (rows[f"r{i}"].logits - case.ref_logits[i]).abs().max().item() for i, t in enumerate(case.tasks)}
    with torch.no_grad():
        out = model(input_ids=torch.tensor([bare]), attention_mask=torch.ones(1, len(bare), dtype=torch.long))
    pooled = {"pooler": lambda: out.pooler_output[0], "cls": lambda: out[0][0, 0], "mean": lambda: out[0][0].mean(0)}
    want = torch.nn.functional.normalize(pooled[bb.pooling]().float(), dim=0)
    diffs["bare"] = (rows["bare"].embedding - want).abs().max().item()
    return diffs


def measure(entry: str, tmp: Path) -> float:
    """The entry's worst difference over every row, step and run (chunked and whole prefill for causal LMs)."""
    case = (encoder_case if entry in ENCODERS else family_case)(entry, tmp / entry)
    for art in case.artifacts.values():
        art.version = 1
    if entry in ENCODERS:
        return max(encoder_differences(case, backbone_of(case.kind)).values())
    model = backbone_of(case.kind)
    return max(
        max(causal_differences(case, run_causal(case, copy.deepcopy(model), chunk), model).values())
        for chunk in (CHUNK, 4096)
    )


# -- the README table ----------------------------------------------------------------------------------------------
def _config_features(config) -> list[str]:
    """What the entry's tiny config switches on, as served (families.py's own reading of it)."""
    out = []
    windows = families.attention_windows(config)
    sliding = [i for i, w in enumerate(windows) if w is not None]
    if sliding:
        out.append(f"window {windows[sliding[0]]} on layers {', '.join(map(str, sliding))} of {len(windows)}")
    for attr, label in (
        ("attn_logit_softcapping", "attention soft-cap"),
        ("final_logit_softcapping", "final soft-cap"),
        ("query_pre_attn_scalar", "query_pre_attn_scalar"),
    ):
        if getattr(config, attr, None) is not None:
            out.append(f"{label} {getattr(config, attr)}")
    if config.model_type == "cohere":
        out.append(f"logit_scale {config.logit_scale}")
    if config.model_type == "gpt_oss":
        out.append("sinks")
    if getattr(config, "num_key_value_heads", None) not in (None, config.num_attention_heads):
        out.append(f"{config.num_key_value_heads} kv heads of {config.num_attention_heads}")
    return out


CAUSAL_ROWS = "bare, Prefix-Tuning, P-Tuning v2, prompt tuning"
ENCODER_ROWS = "Prefix-Tuning, prompt tuning, BitFit, BitFit + prefix (linear heads); bare embedding"


def rows(measured: dict[str, float] | None = None) -> list[list[str]]:
    """The table's rows: every matrix entry, ViT (tests/service/runtime/test_vpt.py), then the refused families."""
    out = []
    for entry, fam in FAMILIES.items():
        config = family_model(entry).config
        served = families.CAUSAL_FAMILIES[config.model_type]
        tasks = CAUSAL_ROWS + (", BitFit + prefix" if fam.biases else "")
        out.append(
            [
                f"`{config.model_type}`" + (f" ({entry})" if entry != config.model_type else ""),
                "served",
                ", ".join(served.features),
                "; ".join(_config_features(config)) or "-",
                tasks + "; chunked and whole prefill, a fork",
                _fmt(measured, entry),
            ]
        )
    for entry in ENCODERS:
        config = encoder_model(entry).config
        features = families.ENCODER_FAMILIES[config.model_type].features
        out.append([f"`{config.model_type}`", "served", ", ".join(features), "-", ENCODER_ROWS, _fmt(measured, entry)])
    vit = families.IMAGE_FAMILIES["vit"]
    out.append(["`vit`", "served", ", ".join(vit.features), "-", "bare, VPT-shallow, VPT-deep (test_vpt.py)", "-"])
    for model_type, reason in families.REFUSED.items():
        out.append([f"`{model_type}`", "refused", reason, "-", "-", "-"])
    return out


def _fmt(measured: dict[str, float] | None, entry: str) -> str:
    return "-" if measured is None else f"{measured[entry]:.1e}"


def render(measured: dict[str, float] | None = None) -> str:
    columns = ["model type", "at start", "what the engine honours", "matrix config", "rows mixed in one batch"]
    head = ["| " + " | ".join(columns) + " | max \\|Δlogit\\| |", "|---|---|---|---|---|---:|"]
    return "\n".join(head + ["| " + " | ".join(r) + " |" for r in rows(measured)])


def _section(text: str) -> re.Match:
    match = re.search(re.escape(START) + r"\n(.*?)" + re.escape(END), text, re.S)
    if match is None:
        raise ValueError(f"README.md has no {START} ... {END} section")
    return match


def readme_table(text: str) -> str:
    return _section(text).group(1).strip()


def without_measured(table: str) -> list[str]:
    """The table's lines with the last (measured) column dropped."""
    return [line.rsplit("|", 2)[0] for line in table.strip().splitlines()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.family_matrix", description=__doc__)
    parser.add_argument("--write", action="store_true", help="write the table into README.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        measured = {entry: measure(entry, Path(tmp)) for entry in [*FAMILIES, *ENCODERS]}
    table = render(measured)
    sys.stdout.write(table + "\n")
    if args.write:
        text = README.read_text()
        section = _section(text)
        README.write_text(text[: section.start()] + f"{START}\n{table}\n{END}" + text[section.end() :])
    return 0


if __name__ == "__main__":
    sys.exit(main())
