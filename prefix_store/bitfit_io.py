"""Bias adapters (bitfit) <-> fine-tuned checkpoints' state dicts.

A BitFit checkpoint is the whole model with only its biases trained. Importing keeps what differs from the serving
backbone: per module path, `delta = tuned bias - base bias` (modules whose bias did not move are left out), and
refuses a checkpoint whose other weights differ from the backbone's (that is full fine-tuning, which bias deltas
cannot reproduce). Names are understood with or without the base model's prefix (`bert.`, `transformer.`, ...),
old LayerNorm names (`gamma` / `beta`), and the tied masked-LM decoder bias counted once (`cls.predictions.bias` is
`cls.predictions.decoder.bias`). A `classifier` (over the pooler) or `score` (last token) head comes along as the
task's linear head.

Exporting writes the tuned biases back under transformers' parameter names, for `model.load_state_dict(sd,
strict=False)`.

`base` below is the serving backbone's biases by module path (service.runtime.bias.bias_targets), `base_weights`
its other parameters by name relative to the base model; both are given by the caller, so this module needs no
model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import torch

from .artifact import BackboneFingerprint, ClassificationHead, PrefixArtifact
from .codec import load_tensors, parse_json, read_safetensors_header
from .errors import ArtifactFormatError, ArtifactShapeError, BackboneMismatch, UnsupportedAdapter

BASE_PREFIXES = ("bert.", "transformer.", "model.", "roberta.", "electra.", "base_model.")
MLM_DECODER_BIAS = "cls.predictions"
_TIED = {"cls.predictions.decoder": MLM_DECODER_BIAS}
_HEADS = {"classifier": "pooler", "score": "last_token"}  # module name -> the pooling it implies
WEIGHT_TOLERANCE = 1e-6  # a weight that moved more than this is not BitFit


def canonical_name(key: str, known: Iterable[str]) -> tuple[str, str] | None:
    """(module path, "bias" | "weight") for a checkpoint parameter name the backbone knows, else None.

    "bert.encoder.layer.0.output.LayerNorm.beta" -> ("encoder.layer.0.output.LayerNorm", "bias").
    """
    known = set(known)
    stem, _, leaf = key.rpartition(".")
    kind = {"bias": "bias", "beta": "bias", "weight": "weight", "gamma": "weight"}.get(leaf)
    if kind is None or not stem:
        return None
    stem = _TIED.get(stem, stem)
    candidates = [stem] + [stem[len(p) :] for p in BASE_PREFIXES if stem.startswith(p)]
    for c in candidates:
        if c in known:
            return c, kind
    return None


MAX_VERBALIZER_LABELS = 256


def parse_verbalizer(raw: str) -> list[tuple[str, str]]:
    """(label, word) pairs from "negative=terrible,positive=great" or a JSON object {"negative": "terrible", ...}."""
    raw = raw.strip()
    if raw.startswith("{"):
        parsed = parse_json(raw, "verbalizer")
        if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
            raise ArtifactFormatError(f"verbalizer: expected a JSON object of label -> word, got {raw[:80]!r}")
        pairs = list(parsed.items())
    else:
        pairs = []
        for item in raw.split(","):
            label, sep, word = item.partition("=")
            if not sep or not label.strip() or not word.strip():
                raise ArtifactFormatError(
                    f"verbalizer: expected label=word pairs separated by commas, got {item!r:.80}"
                )
            pairs.append((label.strip(), word.strip()))
    if not pairs or len(pairs) > MAX_VERBALIZER_LABELS:
        raise ArtifactFormatError(f"verbalizer: expected 1 to {MAX_VERBALIZER_LABELS} labels, got {len(pairs)}")
    return pairs


def import_bias_state_dict(data: bytes, *, max_bytes: int, **kwargs: Any) -> PrefixArtifact:
    """`import_bias_checkpoint` over the bytes of a safetensors state dict (size-capped, never unpickled)."""
    read_safetensors_header(data, max_bytes=max_bytes)
    tensors = load_tensors(data)
    return import_bias_checkpoint(tensors, tensors.__getitem__, **kwargs)


def import_bias_checkpoint(
    keys: Iterable[str],
    read: Callable[[str], torch.Tensor],
    *,
    task: str,
    backbone: BackboneFingerprint,
    base: dict[str, torch.Tensor],
    base_weights: dict[str, torch.Tensor],
    labels: list[str] | None = None,
    template: str | None = None,
    verbalizer: list[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> PrefixArtifact:
    """A bitfit artifact from a checkpoint's parameter names and a reader of one tensor at a time (so a large
    checkpoint is never held whole).

    verbalizer: label token ids (with `labels`) for a [MASK]-reading head; otherwise a `classifier`/`score` head in
    the checkpoint becomes the linear head.
    """
    keys = list(keys)
    deltas: dict[str, torch.Tensor] = {}
    head_tensors: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key in keys:
        module = key.rpartition(".")[0]
        if module in _HEADS:
            head_tensors[key] = read(key)
            continue
        name = canonical_name(key, set(base) | {k.rpartition(".")[0] for k in base_weights})
        if name is None:
            ignored.append(key)
            continue
        path, kind = name
        tensor = read(key)
        if kind == "bias" and path in base:
            if path in deltas:  # the tied decoder bias, stored under both names
                continue
            ref = base[path]
            if tuple(tensor.shape) != tuple(ref.shape):
                raise BackboneMismatch(
                    f"{key}: expected shape {tuple(ref.shape)} like the backbone, got {tuple(tensor.shape)}"
                )
            delta = tensor.float() - ref.float().cpu()
            if not bool(torch.isfinite(delta).all()):
                raise ArtifactFormatError(f"{key}: expected finite values")
            if bool(delta.abs().max() > 0):
                deltas[path] = delta.to(dtype)
            continue
        weight = base_weights.get(f"{path}.{kind}")
        if weight is None:
            ignored.append(key)
            continue
        if tuple(tensor.shape) != tuple(weight.shape):
            raise BackboneMismatch(
                f"{key}: expected shape {tuple(weight.shape)} like the backbone, got {tuple(tensor.shape)}"
            )
        moved = float((tensor.float() - weight.float().cpu()).abs().max())
        if moved > WEIGHT_TOLERANCE:
            raise UnsupportedAdapter(
                f"{key} differs from the serving backbone's by up to {moved:.3g}: this checkpoint changed weights "
                "other than biases (full fine-tuning?), which bias deltas cannot reproduce"
            )
    if not deltas:
        raise ArtifactFormatError(
            f"no bias of the checkpoint differs from the backbone's ({len(keys)} tensors read, e.g. {keys[:3]})"
        )
    head = _head(head_tensors, labels, verbalizer, dtype)
    return PrefixArtifact(
        task=task,
        method="bitfit",
        fingerprint=backbone,
        biases=deltas,
        head=head,
        template=template,
        training={"source": "state_dict", "ignored_tensors": len(ignored)},
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def _head(
    tensors: dict[str, torch.Tensor], labels: list[str] | None, verbalizer: list[int] | None, dtype: torch.dtype
) -> ClassificationHead | None:
    if verbalizer is not None:
        if labels is None or len(labels) != len(verbalizer):
            raise ArtifactShapeError(f"verbalizer: expected one token per label, got {verbalizer} for labels {labels}")
        return ClassificationHead(None, None, list(labels), "mask", token_ids=list(verbalizer))
    for module, pooling in _HEADS.items():
        weight = tensors.get(f"{module}.weight")
        if weight is None:
            continue
        if weight.ndim != 2:
            raise ArtifactShapeError(f"{module}.weight: expected (C, hidden), got {tuple(weight.shape)}")
        names = labels or [f"LABEL_{i}" for i in range(weight.shape[0])]
        if len(names) != weight.shape[0]:
            raise ArtifactShapeError(f"labels: the head has {weight.shape[0]} classes, got {len(names)} names")
        bias = tensors.get(f"{module}.bias")
        return ClassificationHead(weight.to(dtype), None if bias is None else bias.to(dtype), list(names), pooling)
    return None


def export_bias_state_dict(
    artifact: PrefixArtifact, base: dict[str, torch.Tensor], *, base_prefix: str = ""
) -> dict[str, torch.Tensor]:
    """The tuned biases (base + delta) under transformers' names, for `model.load_state_dict(sd, strict=False)`.

    base_prefix: "" for the bare encoder / base model (BertModel, GPT2Model), "bert." for BertForMaskedLM or
    BertForSequenceClassification, "transformer." for GPT2LMHeadModel. Masked-LM head names are the *ForMaskedLM
    ones. A linear head over the pooler goes out as `classifier.*`, over the last token as `score.*`.
    """
    if artifact.biases is None:
        raise UnsupportedAdapter(f"method {artifact.method} carries no bias deltas to export as a state dict")
    out: dict[str, Any] = {}
    for path, delta in artifact.biases.items():
        ref = base.get(path)
        if ref is None:
            raise BackboneMismatch(f"bias delta {path}: the backbone has no such bias")
        name = path if path.startswith(MLM_DECODER_BIAS) else base_prefix + path
        out[f"{name}.bias"] = (ref.float().cpu() + delta.float()).to(ref.dtype).contiguous()
    head = artifact.head
    if head is not None and head.weight is not None:
        module = {v: k for k, v in _HEADS.items()}.get(head.pooling)
        if module is None:
            raise UnsupportedAdapter(f"a {head.pooling!r}-pooled head has no transformers module to export to")
        out[f"{module}.weight"] = head.weight.float().contiguous()
        if head.bias is not None:
            out[f"{module}.bias"] = head.bias.float().contiguous()
    return out
