"""Interchange with Hugging Face PEFT adapter directories (adapter_config.json + adapter_model.safetensors).

PEFT saves one tensor, `prompt_embeddings`:
  PREFIX_TUNING  (P, 2·L·H_kv·D): layer l's keys are columns [2l·td, (2l+1)·td), values the next td, td = H_kv·D
                 (already the MLP output when prefix_projection was on; PEFT sizes it with H_kv under GQA).
  PROMPT_TUNING / P_TUNING  (P, hidden): the soft prompt (P-Tuning's encoder output, not its weights).
SEQ_CLS adapters add their task head: `base_model.classifier.{weight,bias}` (BERT-style, over the pooler output)
or `base_model.score.weight` (decoder models, over the last real token, no bias). CAUSAL_LM and FEATURE_EXTRACTION
adapters are headless.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from .artifact import BackboneFingerprint, ClassificationHead, PrefixArtifact
from .codec import DEFAULT_MAX_BYTES, load_tensors, parse_json, read_safetensors_header
from .errors import ArtifactFormatError, ArtifactShapeError, BackboneMismatch, UnsupportedAdapter
from .methods import REGISTRY, with_peft_type

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_TYPES = tuple(dict.fromkeys(m.peft_type for m in REGISTRY.values() if m.peft_type is not None))
_HEAD_KEYS = {"classifier": "pooler", "score": "last_token"}  # PEFT module name -> pooling it implies
# CAUSAL_LM: generation; SEQ_CLS: with its task head; FEATURE_EXTRACTION: headless (embeddings on encoders).
_TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION")


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
    source = {k: cfg.get(k) for k in ("peft_type", "task_type", "peft_version", "base_model_name_or_path")}
    return PrefixArtifact(
        task=task,
        method=kind,
        fingerprint=backbone,
        head=head,
        training={"source": {"format": "peft", **source}},
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        kv=tensors_of.get("kv"),
        soft_prompt=tensors_of.get("soft_prompt"),
    )


def import_peft_dir(path: str | Path, **kwargs: Any) -> PrefixArtifact:
    path = Path(path)
    return import_peft_adapter((path / CONFIG_NAME).read_bytes(), (path / WEIGHTS_NAME).read_bytes(), **kwargs)


def export_peft_adapter(
    artifact: PrefixArtifact, out_dir: str | Path, *, base_model_name_or_path: str | None = None
) -> Path:
    """Writes a directory that `PeftModel.from_pretrained(base_model, out_dir)` loads (in inference mode)."""
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
    tensors: dict[str, torch.Tensor], task_type: str, labels: list[str] | None, dtype: torch.dtype
) -> ClassificationHead | None:
    if task_type != "SEQ_CLS":
        if tensors:
            raise UnsupportedAdapter(
                f"a {task_type} prompt-learning adapter has only prompt_embeddings, got also {sorted(tensors)}"
            )
        return None
    for module in _HEAD_KEYS:
        weight = tensors.pop(f"base_model.{module}.weight", None)
        if weight is not None:
            bias = tensors.pop(f"base_model.{module}.bias", None)
            break
    else:
        raise UnsupportedAdapter(
            "SEQ_CLS adapter has no linear head: expected base_model.classifier.weight or "
            f"base_model.score.weight, got {sorted(tensors)}"
        )
    if tensors:
        raise UnsupportedAdapter(f"only a linear classification head is supported; unexpected {sorted(tensors)}")
    if weight.ndim != 2:
        raise ArtifactShapeError(f"base_model.{module}.weight: expected (C, hidden), got {tuple(weight.shape)}")
    names = labels if labels is not None else [f"LABEL_{i}" for i in range(weight.shape[0])]
    if len(names) != weight.shape[0]:
        raise ArtifactShapeError(f"labels: head has {weight.shape[0]} classes, got {len(names)} names")
    return ClassificationHead(
        weight=weight.to(dtype),
        bias=None if bias is None else bias.to(dtype),
        labels=list(names),
        pooling=_HEAD_KEYS[module],
    )


def _export_head(artifact: PrefixArtifact) -> dict[str, torch.Tensor]:
    head = artifact.head
    if head is None:
        return {}
    if head.pooling not in _HEAD_KEYS.values():
        raise UnsupportedAdapter(f"PEFT heads pool with 'pooler' or 'last_token'; this head uses {head.pooling!r}")
    module = "classifier" if head.pooling == "pooler" else "score"
    assert head.weight is not None, "a head pooling other than 'mask' is linear (checked when the artifact was made)"
    out = {f"base_model.{module}.weight": head.weight.float().contiguous()}
    if head.bias is not None:
        if module == "score":
            raise UnsupportedAdapter("decoder SEQ_CLS heads ('score') have no bias in transformers; this head has one")
        out[f"base_model.{module}.bias"] = head.bias.float().contiguous()
    return out
