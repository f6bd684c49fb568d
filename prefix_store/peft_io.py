"""Interchange with Hugging Face PEFT adapter directories (adapter_config.json + adapter_model.safetensors).

PEFT saves one tensor, `prompt_embeddings`:
  PREFIX_TUNING  (P, 2·L·H_kv·D): layer l's keys are columns [2l·td, (2l+1)·td), values the next td, td = H_kv·D
                 (already the MLP output when prefix_projection was on; PEFT sizes it with H_kv under GQA).
  PROMPT_TUNING / P_TUNING  (P, hidden): the soft prompt (P-Tuning's encoder output, not its weights).
SEQ_CLS adapters add their task head: `base_model.classifier.{weight,bias}` (BERT-style, over the pooler output)
or `base_model.score.weight` (decoder models, over the last real token, no bias). CAUSAL_LM and FEATURE_EXTRACTION
adapters are headless.

LoRA and IA3 (weight-space adapters) save tensors per adapted module, under the wrapped model's own module names,
`base_model.model.<wrapper prefix><module path>.`:
  LORA  lora_A.weight (r, in), lora_B.weight (out, r), whatever the base layer (GPT-2's Conv1D included:
        fan_in_fan_out is about the base weight only); the scale is lora_alpha / r (lora_alpha / sqrt(r) with
        use_rslora), per module where alpha_pattern / rank_pattern name one (the rank is the tensors').
  IA3   ia3_l: (out, 1) scales the output, (1, in) the input (PEFT's feedforward_modules).
Module paths are stored relative to the base model (the wrapper prefix, `model.` or `transformer.`, dropped, as for
bias deltas), and the prefix is recorded in `training["module_prefix"]` for the export. A SEQ_CLS adapter's head is
`base_model.model.score.weight` / `base_model.model.classifier.{weight,bias}`. What such an adapter may carry that
the server does not reproduce (DoRA, LoRA on embeddings, bias training, modules_to_save besides the head, base-weight
initialisations such as PiSSA) is refused by name (UnsupportedAdapter). Which modules an adapter adapts is PEFT's
target matching of the config (target_modules, exclude_modules, layers_to_transform); tensors of other modules, which
PeftModel.from_pretrained would drop, are refused, as are config fields of the wrong type (400s naming them).
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import regex
import torch
from safetensors.torch import save as st_save

from .artifact import (
    MAX_MODULE_PATH_CHARS,
    BackboneFingerprint,
    ChannelScale,
    ClassificationHead,
    LowRank,
    PrefixArtifact,
    is_module_path,
)
from .codec import DEFAULT_MAX_BYTES, load_tensors, parse_json, read_safetensors_header
from .errors import ArtifactFormatError, ArtifactShapeError, BackboneMismatch, UnsupportedAdapter
from .methods import REGISTRY, with_peft_type

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_TYPES = tuple(dict.fromkeys(m.peft_type for m in REGISTRY.values() if m.peft_type is not None))
_HEAD_KEYS = {"classifier": "pooler", "score": "last_token"}  # PEFT module name -> pooling it implies
# CAUSAL_LM: generation; SEQ_CLS: with its task head; FEATURE_EXTRACTION: headless (embeddings on encoders).
_TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION")
WEIGHT_TYPES = ("LORA", "IA3")  # adapters of the backbone's projections, not of its input
_ROOT = "base_model.model."  # a LoRA / IA3 model's tensors: the wrapped model's names under it
# transformers' base_model_prefix of the *ForCausalLM / *ForSequenceClassification classes of the served families
# ("model." for every other causal family); what a PEFT key has in front of the base model's module path.
_WRAPPER_PREFIX = {
    "gpt2": "transformer.",
    "gpt_neox": "gpt_neox.",
    "bert": "bert.",
    "roberta": "roberta.",
    "xlm-roberta": "roberta.",
    "camembert": "roberta.",
    "electra": "electra.",
}
_BASE_PREFIXES = tuple(dict.fromkeys(("model.", *_WRAPPER_PREFIX.values())))
_ENCODER_TYPES = frozenset(_WRAPPER_PREFIX) - {"gpt2", "gpt_neox"}
# Config fields whose values the server reproduces, or that do not change an inference forward (dropout, the
# initialisation of A and B, the base weight's layout, bookkeeping). Any other field set to a true value is refused.
_COMMON_FIELDS = {
    "peft_type", "task_type", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "target_modules", "exclude_modules", "fan_in_fan_out", "modules_to_save",
}  # fmt: skip
_SERVED_FIELDS = {
    "LORA": _COMMON_FIELDS | {
        "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern",
        "lora_dropout", "init_lora_weights", "bias", "megatron_core", "qalora_group_size", "loftq_config",
        "eva_config", "corda_config", "lora_ga_config", "runtime_config", "ensure_weight_tying",
    },
    "IA3": _COMMON_FIELDS | {"feedforward_modules", "init_ia3_weights"},
}  # fmt: skip
# init_lora_weights that rewrite the base model's weights as they start the factors: such an adapter only works on
# that rewritten base (PEFT converts one to plain LoRA: save_pretrained(path_initial_model_for_weight_conversion)).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def import_peft_adapter(
    config: dict[str, Any] | bytes | str,
    weights: bytes,
    *,
    task: str,
    backbone: BackboneFingerprint,
    labels: list[str] | None = None,
    method: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> PrefixArtifact:
    """Builds an artifact for `backbone` from a PEFT adapter's config and safetensors bytes.

    `method` overrides the method name PEFT cannot tell apart (prefix_tuning vs p_tuning_v2 are both
    PREFIX_TUNING; the default follows `prefix_projection`).
    """
    cfg = _parse_config(config)
    peft_type, task_type = cfg.get("peft_type"), cfg.get("task_type")
    if peft_type not in PEFT_TYPES:
        raise UnsupportedAdapter(f"peft_type: expected one of {', '.join(PEFT_TYPES)}, got {peft_type!r}")
    if peft_type in WEIGHT_TYPES:
        tensors = load_tensors(_checked(weights, max_bytes))
        return _import_weight_adapter(cfg, tensors, task=task, backbone=backbone, labels=labels, method=method)
    if task_type not in _TASK_TYPES:
        raise UnsupportedAdapter(f"task_type: expected one of {', '.join(_TASK_TYPES)}, got {task_type!r}")
    if cfg.get("num_transformer_submodules", 1) != 1:
        got = cfg.get("num_transformer_submodules")
        raise UnsupportedAdapter(f"num_transformer_submodules: expected 1 (decoder-only or encoder), got {got}")
    if cfg.get("num_layers", backbone.num_layers) != backbone.num_layers:
        raise BackboneMismatch(f"num_layers: adapter has {cfg['num_layers']}, backbone has {backbone.num_layers}")

    tensors = load_tensors(_checked(weights, max_bytes))
    if "prompt_embeddings" not in tensors:
        raise ArtifactFormatError(f"{WEIGHTS_NAME}: expected a 'prompt_embeddings' tensor, got {sorted(tensors)}")
    flat = tensors.pop("prompt_embeddings")  # (P, 2·L·td) or (P, hidden)
    num_virtual = cfg.get("num_virtual_tokens")
    if flat.ndim != 2 or flat.shape[0] != num_virtual:
        raise ArtifactShapeError(
            f"prompt_embeddings: expected (num_virtual_tokens={num_virtual}, ...), got {tuple(flat.shape)}"
        )
    head = _import_head(tensors, task_type, labels, flat.dtype)

    allowed = with_peft_type(peft_type)
    if peft_type == "PREFIX_TUNING":  # one PEFT type for both: the reparametrisation tells them apart
        kind = method or ("prefix_tuning" if cfg.get("prefix_projection") else "p_tuning_v2")
    else:
        kind = method or allowed[0]
    if kind not in allowed:
        raise UnsupportedAdapter(f"method {kind!r} cannot come from a {peft_type} adapter: expected one of {allowed}")
    tensors_of: dict[str, torch.Tensor] = {}
    if REGISTRY[kind].fields == ("kv",):
        tensors_of["kv"] = _kv_from_flat(flat, cfg, backbone)
    else:  # (P, hidden): the soft prompt as it is
        if flat.shape[1] != backbone.hidden_size:
            raise BackboneMismatch(
                f"soft prompt width: adapter has {flat.shape[1]}, backbone hidden size is {backbone.hidden_size}"
            )
        tensors_of["soft_prompt"] = flat
    return PrefixArtifact(
        task=task,
        method=kind,
        fingerprint=backbone,
        head=head,
        training={"source": _peft_source(cfg)},
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        kv=tensors_of.get("kv"),
        soft_prompt=tensors_of.get("soft_prompt"),
    )


def import_peft_dir(path: str | Path, **kwargs: Any) -> PrefixArtifact:
    path = Path(path)
    return import_peft_adapter((path / CONFIG_NAME).read_bytes(), (path / WEIGHTS_NAME).read_bytes(), **kwargs)


def export_peft_adapter(
    artifact: PrefixArtifact,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    module_prefix: str | None = None,
) -> Path:
    """Writes a directory that `PeftModel.from_pretrained(base_model, out_dir)` loads (in inference mode).

    module_prefix: LoRA / IA3 only, what the model PEFT wraps puts in front of the base model's module paths
    ("model." for LlamaForCausalLM, "transformer." for GPT2LMHeadModel, "" for a bare AutoModel); default: the one
    the adapter was imported with, else that of the family's *ForCausalLM (*ForSequenceClassification with a head;
    an encoder without a head: its AutoModel)."""
    peft_type = artifact.spec.peft_type
    if peft_type is None:
        also = ""
        if "biases" in artifact.spec.fields:
            also = (
                " or as a state dict (prefix_store.bitfit_io.export_bias_state_dict, GET /v1/tasks/{task}/state_dict)"
            )
        raise UnsupportedAdapter(
            f"PEFT has no adapter type for {artifact.method!r} ({artifact.spec.family.value}): export it as the "
            f"artifact (GET /v1/tasks/{{task}}/artifact){also}"
        )
    fp, out = artifact.fingerprint, Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if peft_type in WEIGHT_TYPES:
        weight_cfg, weight_tensors = _export_weight_adapter(artifact, base_model_name_or_path, module_prefix)
        (out / WEIGHTS_NAME).write_bytes(st_save(weight_tensors))
        (out / CONFIG_NAME).write_text(json.dumps(weight_cfg, indent=2, sort_keys=True))
        return out
    cfg: dict[str, Any] = {
        "peft_type": peft_type,
        "task_type": "SEQ_CLS" if artifact.head is not None else "CAUSAL_LM",
        "num_virtual_tokens": artifact.num_virtual_tokens,
        "num_layers": fp.num_layers,
        "num_transformer_submodules": 1,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "modules_to_save": ["classifier", "score"] if artifact.head is not None else None,
    }
    if peft_type == "PREFIX_TUNING":
        td = fp.num_kv_heads * fp.head_dim
        # The stored tensor is already the final key/values, so PEFT must not put an MLP in front of it.
        cfg.update(token_dim=td, num_attention_heads=fp.num_kv_heads, encoder_hidden_size=td, prefix_projection=False)
        kv = artifact.kv  # (L, 2, H_kv, P, D)
        assert kv is not None, "a PREFIX_TUNING method carries kv (checked when the artifact was made)"
        flat = kv.permute(3, 0, 1, 2, 4).reshape(artifact.num_virtual_tokens, -1)  # (P, 2·L·td)
    else:
        cfg.update(token_dim=fp.hidden_size, num_attention_heads=fp.num_attention_heads)
        if peft_type == "PROMPT_TUNING":
            cfg.update(prompt_tuning_init="RANDOM")
        else:
            cfg.update(
                encoder_reparameterization_type="MLP",
                encoder_hidden_size=fp.hidden_size,
                encoder_num_layers=2,
                encoder_dropout=0.0,
            )
        soft_prompt = artifact.soft_prompt  # (P, hidden)
        assert soft_prompt is not None, "a prompt method carries a soft prompt (checked when the artifact was made)"
        flat = soft_prompt
    tensors = {"prompt_embeddings": flat.float().contiguous()}  # PEFT saves fp32; lossless from fp16/bf16
    tensors.update(_export_head(artifact))
    (out / WEIGHTS_NAME).write_bytes(st_save(tensors))
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return out


def _parse_config(config: dict[str, Any] | bytes | str) -> dict[str, Any]:
    if isinstance(config, dict):
        return config
    parsed = parse_json(config, CONFIG_NAME)
    if not isinstance(parsed, dict):
        raise ArtifactFormatError(f"{CONFIG_NAME}: expected a JSON object, got {type(parsed).__name__}")
    return parsed


def _checked(weights: bytes, max_bytes: int) -> bytes:
    read_safetensors_header(weights, max_bytes=max_bytes)  # size cap, pickle refusal, dtype whitelist
    return weights


def _kv_from_flat(flat: torch.Tensor, cfg: dict[str, Any], fp: BackboneFingerprint) -> torch.Tensor:
    td, heads = cfg.get("token_dim"), cfg.get("num_attention_heads")
    want_td = fp.num_kv_heads * fp.head_dim
    if td != want_td or heads != fp.num_kv_heads:
        raise BackboneMismatch(
            f"prefix geometry: adapter has token_dim={td}, num_attention_heads={heads}; backbone needs "
            f"token_dim=H_kv·D={want_td}, num_attention_heads=H_kv={fp.num_kv_heads} (adapters from PEFT < 0.12 "
            "size grouped-query prefixes with all heads)"
        )
    P, L = flat.shape[0], fp.num_layers
    if flat.shape[1] != 2 * L * td:
        raise ArtifactShapeError(
            f"prompt_embeddings: expected (P, 2·L·td) = ({P}, {2 * L * td}), got {tuple(flat.shape)}"
        )
    x = flat.reshape(P, L, 2, fp.num_kv_heads, fp.head_dim)  # (P, L, 2, H_kv, D)
    return x.permute(1, 2, 3, 0, 4).contiguous()  # (L, 2, H_kv, P, D)


def _import_head(
    tensors: dict[str, torch.Tensor],
    task_type: str,
    labels: list[str] | None,
    dtype: torch.dtype,
    root: str = "base_model.",
) -> ClassificationHead | None:
    if task_type != "SEQ_CLS":
        if tensors:
            raise UnsupportedAdapter(
                f"a {task_type} prompt-learning adapter has only prompt_embeddings, got also {sorted(tensors)}"
            )
        return None
    for module in _HEAD_KEYS:
        weight = tensors.pop(f"{root}{module}.weight", None)
        if weight is not None:
            bias = tensors.pop(f"{root}{module}.bias", None)
            break
    else:
        raise UnsupportedAdapter(
            f"SEQ_CLS adapter has no linear head: expected {root}classifier.weight or {root}score.weight, got "
            f"{sorted(tensors)[:10]}"
        )
    if tensors:
        raise UnsupportedAdapter(f"only a linear classification head is supported; unexpected {sorted(tensors)}")
    if weight.ndim != 2:
        raise ArtifactShapeError(f"{root}{module}.weight: expected (C, hidden), got {tuple(weight.shape)}")
    names = labels if labels is not None else [f"LABEL_{i}" for i in range(weight.shape[0])]
    if len(names) != weight.shape[0]:
        raise ArtifactShapeError(f"labels: head has {weight.shape[0]} classes, got {len(names)} names")
    return ClassificationHead(
        weight=weight.to(dtype),
        bias=None if bias is None else bias.to(dtype),
        labels=list(names),
        pooling=_HEAD_KEYS[module],
    )


def _export_head(artifact: PrefixArtifact, root: str = "base_model.") -> dict[str, torch.Tensor]:
    head = artifact.head
    if head is None:
        return {}
    if head.pooling not in _HEAD_KEYS.values():
        raise UnsupportedAdapter(f"PEFT heads pool with 'pooler' or 'last_token'; this head uses {head.pooling!r}")
    module = "classifier" if head.pooling == "pooler" else "score"
    assert head.weight is not None, "a head pooling other than 'mask' is linear (checked when the artifact was made)"
    out = {f"{root}{module}.weight": head.weight.float().contiguous()}
    if head.bias is not None:
        if module == "score":
            raise UnsupportedAdapter("decoder SEQ_CLS heads ('score') have no bias in transformers; this head has one")
        out[f"{root}{module}.bias"] = head.bias.float().contiguous()
    return out


# -- LoRA and IA3 --------------------------------------------------------------------------------------------------
_DEFAULT_R = _DEFAULT_ALPHA = 8  # LoraConfig's defaults: what PEFT uses where a config leaves r or lora_alpha out
# User patterns (a target_modules / exclude_modules / feedforward_modules regex, rank_pattern and alpha_pattern keys,
# layers_pattern) run against the module keys an adapter's tensors name. PEFT runs them with `re`, whose backtracking
# a crafted pattern makes exponential (`(a|aa)+` on a 40-character key: minutes, holding the GIL). So each pattern is
# compiled by `re` first (what PEFT refuses is refused), then run by the `regex` package, whose matching takes a
# timeout: all of one import's matching gets MATCH_SECONDS. `regex` compiles counted repeats by expansion, so nested
# ones multiply (`((?:a{1000}){1000}){10}`: 3 GB before any timeout applies): the product of a pattern's repeat
# counts is bounded first. Where `regex` reads syntax `re` accepts another way (braces that are no repeat count:
# fuzzy matching; `[:`: POSIX classes), the pattern is refused; under `re` neither matches a module name anyway.
MATCH_SECONDS = 2.0
MAX_PATTERN_CHARS = 1000
MAX_REPEAT_PRODUCT = 10_000
_REPEAT = re.compile(r"\{(\d*),?(\d*)\}")


def _import_weight_adapter(
    cfg: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    task: str,
    backbone: BackboneFingerprint,
    labels: list[str] | None,
    method: str | None,
) -> PrefixArtifact:
    """A lora or ia3 artifact from a LORA or IA3 adapter's config and tensors (see the module docstring)."""
    peft_type, task_type = cfg["peft_type"], cfg.get("task_type")
    if task_type not in (*_TASK_TYPES, None):
        raise UnsupportedAdapter(f"task_type: expected one of {', '.join(_TASK_TYPES)} or none, got {task_type!r}")
    allowed = with_peft_type(peft_type)
    kind = method or allowed[0]
    if kind not in allowed:
        raise UnsupportedAdapter(f"method {kind!r} cannot come from a {peft_type} adapter: expected one of {allowed}")
    _check_fields(cfg, peft_type)
    _refuse_unserved_options(cfg, peft_type)
    head = None
    names = {f"{_ROOT}{m}.{w}" for m in _HEAD_KEYS for w in ("weight", "bias")}
    deep_head = sorted(k for k in tensors if k.startswith(f"{_ROOT}classifier.") and k not in names)
    if deep_head:
        raise UnsupportedAdapter(
            f"{deep_head[0]}: a two-layer classification head (RoBERTa's or ELECTRA's classifier.dense and "
            "classifier.out_proj, trained whole through modules_to_save) is not served, only a linear head "
            "(classifier.weight over the pooler output, or score.weight over the last token)"
        )
    if task_type == "SEQ_CLS" or names & set(tensors):  # a head saved without the task type is a head all the same
        head_tensors = {k: tensors.pop(k) for k in list(tensors) if k in names}
        dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
        head = _import_head(head_tensors, "SEQ_CLS", labels, dtype, root=_ROOT)
    patterns = _Patterns()
    if peft_type == "LORA":
        modules = _module_tensors(tensors, ("lora_A.weight", "lora_B.weight"), _lora_unserved)
        _check_targeted(cfg, list(modules), patterns)
        low_rank = {key: _low_rank(key, parts, cfg, patterns) for key, parts in modules.items()}
        paths, prefix = _base_paths(list(low_rank))
        adapted: dict[str, Any] = {"low_rank": dict(zip(paths, low_rank.values(), strict=True))}
    else:
        only = "IA3 adapters carry ia3_l vectors (and a classification head) only"
        modules = _module_tensors(tensors, ("ia3_l",), lambda keys: f"{keys[:3]}: {only}")
        _check_targeted(cfg, list(modules), patterns)
        scales = {key: _channel_scale(key, parts["ia3_l"], cfg, patterns) for key, parts in modules.items()}
        paths, prefix = _base_paths(list(scales))
        adapted = {"scales": dict(zip(paths, scales.values(), strict=True))}
    return PrefixArtifact(
        task=task,
        method=kind,
        fingerprint=backbone,
        head=head,
        training={"source": _peft_source(cfg), "module_prefix": prefix},
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        **adapted,
    )


def _check_fields(cfg: dict[str, Any], peft_type: str) -> None:
    """The config fields the server reads have the types PEFT gives them (a malformed one is refused naming it,
    before anything uses it)."""

    def bad(name: str, expected: str) -> ArtifactFormatError:
        return ArtifactFormatError(f"{CONFIG_NAME} {name}: expected {expected}, got {cfg.get(name)!r:.80}")

    def names(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(x, str) for x in value)

    targets = cfg.get("target_modules")
    if targets is None:
        raise UnsupportedAdapter(
            f"{CONFIG_NAME} target_modules: none named; PEFT would take its default for the model type, which the "
            "server does not guess (the configs PEFT saves name them)"
        )
    for name in ("target_modules", "exclude_modules", "feedforward_modules"):
        value = cfg.get(name)
        if value is not None and not isinstance(value, str) and not names(value):
            raise bad(name, "a list of module names, a regular expression (a string) or null")
    if cfg.get("modules_to_save") is not None and not names(cfg["modules_to_save"]):
        raise bad("modules_to_save", "a list of module names or null")
    if peft_type == "IA3":
        ff = cfg.get("feedforward_modules")
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            raise bad("feedforward_modules", f"a subset of target_modules (PEFT refuses others), {targets!r:.80}")
        return
    r = cfg.get("r", _DEFAULT_R)
    if not _is_int(r) or r < 1:
        raise bad("r", "a positive integer (the rank)")
    if not _is_number(cfg.get("lora_alpha", _DEFAULT_ALPHA)):
        raise bad("lora_alpha", "a finite number")
    if cfg.get("use_rslora") is not None and not isinstance(cfg["use_rslora"], bool):
        raise bad("use_rslora", "true or false")
    for name, ok, what in (
        ("rank_pattern", lambda v: _is_int(v) and v >= 1, "positive integers"),
        ("alpha_pattern", _is_number, "finite numbers"),
    ):
        value = cfg.get(name) or {}
        if not isinstance(value, dict) or not all(isinstance(k, str) and ok(v) for k, v in value.items()):
            raise bad(name, f"an object mapping module patterns to {what}")
    layers, layers_pattern = cfg.get("layers_to_transform"), cfg.get("layers_pattern")
    if layers is not None and not _is_int(layers) and not (isinstance(layers, list) and all(map(_is_int, layers))):
        raise bad("layers_to_transform", "a layer index, a list of them or null")
    if layers_pattern is not None and not isinstance(layers_pattern, str) and not names(layers_pattern):
        raise bad("layers_pattern", "a module name, a list of them or null")
    if isinstance(targets, str) and (layers is not None or layers_pattern is not None):
        raise bad("layers_to_transform", "null with a target_modules regular expression (PEFT refuses both)")
    if layers_pattern and layers is None:
        raise bad("layers_to_transform", "the layers, as layers_pattern is set (PEFT refuses it alone)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _refuse_unserved_options(cfg: dict[str, Any], peft_type: str) -> None:
    """Refuses, by name, every config option that changes the forward in a way the server does not reproduce."""
    name = "LoRA" if peft_type == "LORA" else "IA3"
    if cfg.get("use_dora"):
        raise UnsupportedAdapter(
            "DoRA adapters (use_dora) are not served: their magnitude vector rescales each adapted weight's columns "
            "after the update, which the per-row LoRA path does not reproduce"
        )
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise UnsupportedAdapter(
            f"LoRA bias training (bias={cfg.get('bias')!r}, lora_bias={cfg.get('lora_bias')!r}) is not served: "
            "expected bias 'none' (upload trained biases as a bitfit task instead)"
        )
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise UnsupportedAdapter(
            f"init_lora_weights={init!r} rewrites the base model's weights, so the adapter only works on that "
            "rewritten base: convert it to plain LoRA first (PEFT: save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...))"
        )
    extra = sorted(set(cfg.get("modules_to_save") or ()) - set(_HEAD_KEYS))
    if extra:
        raise UnsupportedAdapter(
            f"modules_to_save {extra}: fully trained modules are not served (only a classification head, "
            f"{' or '.join(_HEAD_KEYS)})"
        )
    for key, value in cfg.items():
        if key not in _SERVED_FIELDS[peft_type] and value:
            raise UnsupportedAdapter(
                f"{name} option {key}={value!r:.80} is not served: the server reproduces plain {name}"
                + (" (rsLoRA, rank and alpha patterns, layer subsets included)" if peft_type == "LORA" else "")
            )


def _module_tensors(
    tensors: dict[str, torch.Tensor], suffixes: tuple[str, ...], unserved: Callable[[list[str]], str]
) -> dict[str, dict[str, torch.Tensor]]:
    """Module key (as the wrapped model names it) -> {suffix: tensor}, every tensor one of `suffixes` of a module
    under base_model.model.; anything else is refused with `unserved(the other keys)`. Every key is a module name
    (is_module_path) before any pattern of the config runs on it."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    others = []
    for key, t in tensors.items():
        suffix = next((x for x in suffixes if key.startswith(_ROOT) and key.endswith("." + x)), None)
        if suffix is None:
            others.append(key)
        else:
            out.setdefault(key[len(_ROOT) : -len(suffix) - 1], {})[suffix] = t
    if others:
        raise UnsupportedAdapter(unserved(sorted(others)))
    if not out:
        raise ArtifactFormatError(f"{WEIGHTS_NAME}: expected the adapter's tensors ({', '.join(suffixes)}), got none")
    for key, parts in out.items():
        if not is_module_path(key):
            raise ArtifactFormatError(
                f"{WEIGHTS_NAME}: {key!r:.80} is no module name (dotted names of letters, digits and '_', at most "
                f"{MAX_MODULE_PATH_CHARS} characters)"
            )
        if len(parts) != len(suffixes):
            raise ArtifactFormatError(f"{key}: expected {' and '.join(suffixes)}, got only {sorted(parts)}")
    return out


def _check_targeted(cfg: dict[str, Any], keys: list[str], patterns: _Patterns) -> None:
    """Refuses tensors of modules the config does not target: PeftModel.from_pretrained makes adapter layers only
    where the config targets and drops the rest of the state dict, so serving them would not be that adapter."""
    stray = [key for key in keys if not _targeted(cfg, key, patterns)]
    if stray:
        shown = {k: cfg.get(k) for k in ("target_modules", "exclude_modules", "layers_to_transform") if cfg.get(k)}
        raise ArtifactFormatError(
            f"{len(stray)} modules have tensors but are not targeted by the config ({shown!r:.160}), e.g. "
            f"{stray[:3]}: PEFT ignores those tensors when it loads the adapter; drop them or target the modules"
        )


def _targeted(cfg: dict[str, Any], key: str, patterns: _Patterns) -> bool:
    """PEFT's check_target_module_exists (peft.tuners.tuners_utils) for the module `key` of the wrapped model:
    exclude_modules, then modules_to_save (never adapted), then target_modules (a list: the key or a name ending it
    after a '.', with layers_to_transform / layers_pattern; a string: a regular expression the whole key matches, or
    "all-linear")."""
    exclude = cfg.get("exclude_modules")
    if isinstance(exclude, str):
        if patterns.match(exclude, key, "exclude_modules", exclude, full=True):
            return False
    elif exclude and (key in exclude or any(key.endswith(f".{x}") for x in exclude)):
        return False
    for m in cfg.get("modules_to_save") or ():
        if patterns.match(rf"(^|.*\.){m}($|\..*)", key, "modules_to_save", m):
            return False
    targets = cfg["target_modules"]
    if isinstance(targets, str):  # PEFT's all-linear: every Linear / Conv1D but the output head (refused on its own)
        all_linear = targets.lower() == "all-linear"
        return all_linear or bool(patterns.match(targets, key, "target_modules", targets, full=True))
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    layers_pattern = cfg.get("layers_pattern")
    found = None
    if not layers_pattern:  # the first numbered name (the layer's index, not an expert's)
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)  # a fixed pattern: no backtracking blow-up
    else:
        for p in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            found = patterns.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key, "layers_pattern", p)
            if found:
                break
    if not found:
        return False
    index = int(found.group("idx"))
    return bool(index == layers) if _is_int(layers) else index in layers


class _Patterns:
    """One import's user patterns, compiled once each and matched under one time budget (see MATCH_SECONDS)."""

    def __init__(self) -> None:
        self._deadline = time.monotonic() + MATCH_SECONDS
        self._compiled: dict[str, Any] = {}

    def match(self, pattern: str, key: str, field: str, user: str, *, full: bool = False) -> Any:
        """`pattern` (built around the user's `user`, from the config's `field`) matched at the start of `key`
        (`full`: the whole key), as re.match / re.fullmatch would: the match, or None."""
        compiled = self._compiled.get(pattern)
        if compiled is None:
            compiled = self._compiled[pattern] = _compile(pattern, field, user)
        left = self._deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            # concurrent: the GIL released while it matches (a str cannot change meanwhile)
            return (compiled.fullmatch if full else compiled.match)(key, timeout=left, concurrent=True)
        except TimeoutError:
            raise UnsupportedAdapter(
                f"{field} {user!r:.80}: matching the config's patterns against the adapter's module names took more "
                f"than {MATCH_SECONDS} s (a pattern that backtracks without end?): simplify the patterns"
            ) from None


def _compile(pattern: str, field: str, user: str) -> Any:
    """`pattern` compiled by `regex`, once `re` has accepted it and the user's part is bounded (see MATCH_SECONDS)."""
    if len(user) > MAX_PATTERN_CHARS:
        raise UnsupportedAdapter(f"{field} pattern of {len(user)} characters: at most {MAX_PATTERN_CHARS}")
    try:
        with warnings.catch_warnings():  # re warns a later Python may read `[[` otherwise; PEFT's re reads it so
            warnings.simplefilter("ignore", FutureWarning)
            re.compile(pattern)
    except re.error as e:
        raise ArtifactFormatError(f"{field} {user!r:.80}: not a regular expression: {e}") from None
    product = 1
    for i in (i for i, c in enumerate(user) if c == "{"):
        count = _REPEAT.match(user, i)
        if count is None or not any(count.groups()):
            raise UnsupportedAdapter(f"{field} {user!r:.80}: braces are served as repeat counts ({{m}}, {{m,n}}) only")
        product *= max(1, int(count[2] or count[1]))
    if product > MAX_REPEAT_PRODUCT:
        raise UnsupportedAdapter(
            f"{field} {user!r:.80}: its repeat counts multiply to {product}, at most {MAX_REPEAT_PRODUCT}"
        )
    if "[:" in user:
        raise UnsupportedAdapter(f"{field} {user!r:.80}: '[:' (a POSIX class to some engines) is not served")
    try:
        return regex.compile(pattern)
    except regex.error as e:
        raise ArtifactFormatError(f"{field} {user!r:.80}: not a regular expression: {e}") from None


def _lora_unserved(keys: list[str]) -> str:
    """Why a LoRA adapter's other tensors are refused, the most telling reason first."""
    for marker, why in (
        ("lora_embedding_", "LoRA on an embedding layer is not served (only on the body's linear projections)"),
        ("lm_head", "LoRA on the LM head is not served (only on the body's linear projections)"),
        (
            ".base_layer.",
            "a copy of a base layer, which PEFT saves when an adapter targets the embeddings or the LM "
            "head: LoRA on those is not served (only on the body's linear projections)",
        ),
        ("lora_magnitude_vector", "DoRA's magnitude vector is not served"),
        (".bias", "trained biases are not served with LoRA (upload them as a bitfit task)"),
    ):
        hits = [k for k in keys if marker in k]
        if hits:
            return f"{hits[0]}: {why}"
    return f"{keys[:3]}: only LoRA factors (lora_A / lora_B) and a classification head are served"


def _low_rank(key: str, parts: dict[str, torch.Tensor], cfg: dict[str, Any], patterns: _Patterns) -> LowRank:
    """One module's factors and scale, the scale as PEFT computes it for the module named `key` (the config's fields
    checked by _check_fields)."""
    a, b = parts["lora_A.weight"], parts["lora_B.weight"]
    if a.ndim != 2 or b.ndim != 2:
        raise UnsupportedAdapter(
            f"{key}: LoRA on a convolution (lora_A {tuple(a.shape)}) is not served, only on linear projections"
        )
    r = a.shape[0]
    if b.shape[1] != r:
        raise ArtifactShapeError(f"{key}: lora_A (r, in) = {tuple(a.shape)} and lora_B (out, r) = {tuple(b.shape)}")
    want = _pattern_value(cfg.get("rank_pattern") or {}, key, cfg.get("r", _DEFAULT_R), patterns, "rank_pattern")
    if want != r:  # want >= 1: a rank-0 adapter stops here
        raise ArtifactShapeError(f"{key}: r / rank_pattern say rank {want!r}, its lora_A has rank {r}")
    default_alpha = cfg.get("lora_alpha", _DEFAULT_ALPHA)
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, key, default_alpha, patterns, "alpha_pattern")
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return LowRank(a, b, scale)


def _pattern_value(patterns: dict[str, Any], key: str, default: Any, matcher: _Patterns, field: str) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first pattern that
    matches the end of the module key at a name boundary, else `default`."""
    for pattern, value in patterns.items():
        if matcher.match(rf"(.*\.)?({pattern})$", key, field, pattern):
            return value
    return default


def _channel_scale(key: str, l: torch.Tensor, cfg: dict[str, Any], patterns: _Patterns) -> ChannelScale:  # noqa: E741
    """An IA3 vector: PEFT stores (out, 1) for an output scale, (1, in) for a feed-forward module's input scale,
    the side its feedforward_modules say (a regular expression the whole key matches, or names ending it)."""
    if l.ndim != 2 or 1 not in l.shape:
        raise UnsupportedAdapter(f"{key}.ia3_l {tuple(l.shape)}: IA3 on a convolution is not served")
    ff = cfg.get("feedforward_modules")
    said = None
    if isinstance(ff, str):
        said = bool(patterns.match(ff, key, "feedforward_modules", ff, full=True))
    elif ff is not None:
        said = any(key.endswith(k) for k in ff)
    if l.shape == (1, 1):  # the shape cannot tell: the config's word (PEFT's own rule)
        return ChannelScale(l.reshape(-1), bool(said))
    on_input = l.shape[0] == 1
    if said is not None and said != on_input:
        raise ArtifactShapeError(
            f"{key}.ia3_l {tuple(l.shape)}: feedforward_modules make it scale the module's "
            f"{'input, (1, in)' if said else 'output, (out, 1)'}: PEFT would not load this vector"
        )
    return ChannelScale(l.reshape(-1), on_input)


def _base_paths(keys: list[str]) -> tuple[list[str], str]:
    """Module paths relative to the base model (the wrapper's prefix, e.g. "model.", dropped from every key that has
    it) and the prefix dropped ("" when none: an adapter of the bare model). Two keys that would name one path (with
    and without the prefix) are refused: PEFT adapts at most one of them, a module the wrapped model has."""
    counts = {p: sum(k.startswith(p) for k in keys) for p in _BASE_PREFIXES}
    prefix = max(counts, key=counts.__getitem__)
    if not counts[prefix]:
        prefix = ""
    paths = [k.removeprefix(prefix) for k in keys]
    twice = sorted(p for p, n in Counter(paths).items() if n > 1)
    if twice:
        raise ArtifactFormatError(
            f"{WEIGHTS_NAME}: tensors for both {prefix}{twice[0]} and {twice[0]}: one module of the base model under "
            "two names (expected every key under the one prefix of the model PEFT wrapped)"
        )
    return paths, prefix


def _module_prefix(artifact: PrefixArtifact) -> str:
    recorded = artifact.training.get("module_prefix")
    if isinstance(recorded, str):
        return recorded
    model_type = artifact.fingerprint.model_type
    if model_type in _ENCODER_TYPES and artifact.head is None:
        return ""  # an encoder without a head: PEFT wraps its AutoModel
    return _WRAPPER_PREFIX.get(model_type, "model.")


def _export_weight_adapter(
    artifact: PrefixArtifact, base_model_name_or_path: str | None, module_prefix: str | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A LORA or IA3 adapter's config and tensors. Every module's scale comes back as its own alpha (alpha_pattern,
    rank_pattern where ranks differ), so PEFT computes the same scale."""
    prefix = _module_prefix(artifact) if module_prefix is None else module_prefix
    encoder = artifact.fingerprint.model_type in _ENCODER_TYPES
    task_type = "SEQ_CLS" if artifact.head is not None else "FEATURE_EXTRACTION" if encoder else "CAUSAL_LM"
    cfg: dict[str, Any] = {
        "peft_type": artifact.spec.peft_type,
        "task_type": task_type,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "fan_in_fan_out": False,  # PEFT sets it for Conv1D base layers itself (it concerns merging only)
        "modules_to_save": ["classifier", "score"] if artifact.head is not None else None,
    }
    tensors: dict[str, torch.Tensor] = {}
    if artifact.low_rank is not None:
        ranks = {p: f.rank for p, f in artifact.low_rank.items()}
        alphas = {p: f.scale * f.rank for p, f in artifact.low_rank.items()}
        r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank, the rest by pattern
        alpha = max(set(alphas.values()), key=list(alphas.values()).count)
        cfg.update(
            r=r,
            lora_alpha=alpha,
            use_rslora=False,
            target_modules=sorted(artifact.low_rank),
            rank_pattern={re.escape(p): v for p, v in ranks.items() if v != r},
            alpha_pattern={re.escape(p): v for p, v in alphas.items() if v != alpha},
            lora_dropout=0.0,
            bias="none",
            init_lora_weights=True,
        )
        for path, f in artifact.low_rank.items():
            tensors[f"{_ROOT}{prefix}{path}.lora_A.weight"] = f.a.float().contiguous()
            tensors[f"{_ROOT}{prefix}{path}.lora_B.weight"] = f.b.float().contiguous()
    else:
        scales = artifact.scales or {}
        cfg.update(
            target_modules=sorted(scales),
            feedforward_modules=sorted(p for p, s in scales.items() if s.on_input),
            init_ia3_weights=True,
        )
        for path, s in scales.items():
            shape = (1, -1) if s.on_input else (-1, 1)
            tensors[f"{_ROOT}{prefix}{path}.ia3_l"] = s.vector.float().reshape(shape).contiguous()
    tensors.update(_export_head(artifact, root=_ROOT))
    return cfg, tensors


def _peft_source(cfg: dict[str, Any]) -> dict[str, Any]:
    """Where an imported adapter came from, for its training metadata: PEFT's own record of its type and base."""
    keys = ("peft_type", "task_type", "peft_version", "base_model_name_or_path")
    return {"format": "peft", **{k: cfg.get(k) for k in keys}}
