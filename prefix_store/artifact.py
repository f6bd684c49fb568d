"""The prefix artifact: one self-describing record per task version.

Shapes use the project's letters: L layers, H_kv key/value heads, P virtual tokens, D head dim, C labels.
Key/value methods (prefix_tuning, p_tuning_v2) carry `kv` (L, 2, H_kv, P, D), index 0 = keys, 1 = values.
Soft-prompt methods (prompt_tuning, p_tuning) carry `soft_prompt` (P, hidden).
An artifact that exists has passed validation: constructing one checks every invariant below.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ArtifactFormatError, ArtifactShapeError, BackboneMismatch, InvalidTaskName, NonFiniteTensorError

KV_METHODS = ("prefix_tuning", "p_tuning_v2")
SOFT_PROMPT_METHODS = ("prompt_tuning", "p_tuning")
METHODS = KV_METHODS + SOFT_PROMPT_METHODS
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
POOLINGS = ("pooler", "cls", "mean", "last_token")
# (task, version) names one stored version's tensors: versions are immutable and their numbers never reused, so every
# cache tier keys by it.
VersionKey = tuple[str, int]

_TASK_NAME = re.compile(r"[a-z0-9._-]{1,64}")


def validate_task_name(name: object) -> str:
    """1 to 64 characters from [a-z0-9._-], not only dots ('.' and '..' are path segments no client can address)."""
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name) or not name.strip("."):
        shown = repr(name) if not isinstance(name, str) or len(name) <= 80 else f"{name[:80]!r}... ({len(name)} chars)"
        raise InvalidTaskName(
            f"invalid task name {shown}: expected 1 to 64 characters from lower-case letters, digits, '.', '_', '-', "
            "not only dots"
        )
    return name


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ArtifactFormatError(f"unsupported dtype {dtype}: expected one of {', '.join(DTYPES)}")


@dataclass(frozen=True)
class BackboneFingerprint:
    """The geometry a prefix depends on. Two backbones with equal fingerprints accept the same prefixes."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int  # H_kv: equals num_attention_heads unless the model uses grouped-query attention
    head_dim: int  # D
    vocab_size: int

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ArtifactFormatError(f"fingerprint {f.name}: expected a positive int, got {value!r}")
        if not isinstance(self.model_type, str) or not self.model_type:
            raise ArtifactFormatError(f"backbone fingerprint model_type: expected a string, got {self.model_type!r}")

    @classmethod
    def from_config(cls, config: Any) -> BackboneFingerprint:
        """Reads a transformers PretrainedConfig (attribute_map makes GPT-2's n_layer etc. visible too)."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            model_type=config.model_type,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_attention_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneFingerprint:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(data)
        if missing:
            raise ArtifactFormatError(f"backbone fingerprint lacks fields {sorted(missing)}")
        fp = cls(**{k: data[k] for k in names})
        if "digest" in data and data["digest"] != fp.digest:
            raise ArtifactFormatError(f"backbone fingerprint digest: expected {fp.digest}, got {data['digest']}")
        return fp

    @property
    def digest(self) -> str:
        canonical = json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "digest": self.digest}

    def differences(self, other: BackboneFingerprint) -> list[str]:
        """Human-readable 'field: prefix has X, backbone has Y' lines; empty when they match."""
        return [
            f"{f.name}: prefix has {getattr(self, f.name)!r}, backbone has {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    def require_match(self, backbone: BackboneFingerprint) -> None:
        diffs = self.differences(backbone)
        if diffs:
            raise BackboneMismatch("prefix was made for another backbone: " + "; ".join(diffs))


@dataclass
class ClassificationHead:
    """A per-task linear head over a pooled hidden state."""

    weight: torch.Tensor  # (C, hidden)
    bias: torch.Tensor | None  # (C,)
    labels: list[str]  # C names, index i names row i of weight
    pooling: str  # "pooler" (BERT pooler output), "cls", "mean", or "last_token" (causal LMs)


@dataclass
class PrefixArtifact:
    """One version of one task's prefix.

    Args:
        task: validated task name.
        version: assigned by the store on publish; None before.
        method: one of METHODS.
        fingerprint: the backbone the prefix was trained on.
        kv: (L, 2, H_kv, P, D) for KV_METHODS, else None.
        soft_prompt: (P, hidden) for SOFT_PROMPT_METHODS, else None.
        head: optional classification head, same dtype as the prefix.
        training: free-form training metadata (dataset, metrics, ...), JSON-serialisable.
        created_at: ISO-8601 UTC timestamp.
    """

    task: str
    method: str
    fingerprint: BackboneFingerprint
    kv: torch.Tensor | None = None
    soft_prompt: torch.Tensor | None = None
    head: ClassificationHead | None = None
    version: int | None = None
    training: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""

    def __post_init__(self) -> None:
        validate_task_name(self.task)
        if self.method not in METHODS:
            raise ArtifactFormatError(f"unknown method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.version is not None and (not isinstance(self.version, int) or self.version < 1):
            raise ArtifactFormatError(f"version: expected a positive int or None, got {self.version!r}")
        self._check_prefix_tensor()
        if self.head is not None:
            self._check_head(self.head)
        try:
            json.dumps(self.training)
        except (TypeError, ValueError) as e:
            raise ArtifactFormatError(f"training metadata is not JSON-serialisable: {e}") from None

    # -- validation -----------------------------------------------------------------------------------------------
    def _check_prefix_tensor(self) -> None:
        fp = self.fingerprint
        if self.method in KV_METHODS:
            name, tensor, other = "kv", self.kv, self.soft_prompt
        else:
            name, tensor, other = "soft_prompt", self.soft_prompt, self.kv
        if tensor is None or other is not None:
            raise ArtifactFormatError(f"method {self.method} carries exactly one tensor, {name!r}")
        if tensor.dtype not in DTYPES.values():
            raise ArtifactFormatError(f"{name} dtype: expected one of {', '.join(DTYPES)}, got {tensor.dtype}")
        if name == "kv":
            expected = (fp.num_layers, 2, fp.num_kv_heads, None, fp.head_dim)
            labels = "(L, 2, H_kv, P, D)"
        else:
            expected = (None, fp.hidden_size)
            labels = "(P, hidden)"
        shape = tuple(tensor.shape)
        if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape, strict=True)):
            want = tuple("P" if e is None else e for e in expected)
            raise ArtifactShapeError(f"{name} shape: expected {labels} = {want}, got {shape}")
        if self.num_virtual_tokens < 1:
            raise ArtifactShapeError(f"{name}: expected at least one virtual token, got P = {self.num_virtual_tokens}")
        _require_finite(name, tensor)

    def _check_head(self, head: ClassificationHead) -> None:
        num_labels = len(head.labels)
        if num_labels < 1 or len(set(head.labels)) != num_labels or not all(isinstance(x, str) for x in head.labels):
            raise ArtifactFormatError(f"head labels: expected distinct strings, got {head.labels!r}")
        want = (num_labels, self.fingerprint.hidden_size)
        if tuple(head.weight.shape) != want:
            got = tuple(head.weight.shape)
            raise ArtifactShapeError(f"head.weight shape: expected (C, hidden) = {want}, got {got}")
        if head.bias is not None and tuple(head.bias.shape) != (num_labels,):
            raise ArtifactShapeError(f"head.bias shape: expected (C,) = ({num_labels},), got {tuple(head.bias.shape)}")
        if head.pooling not in POOLINGS:
            raise ArtifactFormatError(f"head pooling {head.pooling!r}: expected one of {', '.join(POOLINGS)}")
        for name, t in (("head.weight", head.weight), ("head.bias", head.bias)):
            if t is None:
                continue
            if t.dtype != self.dtype:
                raise ArtifactFormatError(f"{name} dtype: expected {self.dtype_name} like the prefix, got {t.dtype}")
            _require_finite(name, t)

    # -- derived --------------------------------------------------------------------------------------------------
    @property
    def key(self) -> VersionKey:
        """(task, version): what caches key a stored version by (versions are immutable and never renumbered)."""
        if self.version is None:
            raise ValueError(f"artifact of {self.task!r} has no version yet: only stored versions have a key")
        return (self.task, self.version)

    @property
    def prefix_tensor(self) -> torch.Tensor:
        return self.kv if self.kv is not None else self.soft_prompt  # type: ignore[return-value]

    @property
    def num_virtual_tokens(self) -> int:
        return self.kv.shape[3] if self.kv is not None else self.soft_prompt.shape[0]  # type: ignore[union-attr]

    @property
    def dtype(self) -> torch.dtype:
        return self.prefix_tensor.dtype

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def nbytes(self) -> int:
        tensors = [self.prefix_tensor]
        if self.head is not None:
            tensors += [t for t in (self.head.weight, self.head.bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def with_task(self, task: str) -> PrefixArtifact:
        return self if task == self.task else dataclasses.replace(self, task=validate_task_name(task))

    def to(self, dtype: torch.dtype) -> PrefixArtifact:
        """A copy with every tensor cast to `dtype` (e.g. fp32 PEFT import served in bf16)."""
        head = self.head
        if head is not None:
            bias = head.bias.to(dtype) if head.bias is not None else None
            head = dataclasses.replace(head, weight=head.weight.to(dtype), bias=bias)
        kv = self.kv.to(dtype) if self.kv is not None else None
        soft = self.soft_prompt.to(dtype) if self.soft_prompt is not None else None
        return dataclasses.replace(self, kv=kv, soft_prompt=soft, head=head)

    def summary(self) -> dict[str, Any]:
        """Everything but the tensors: what listing endpoints show without loading the prefix."""
        head = None
        if self.head is not None:
            head = {"labels": list(self.head.labels), "pooling": self.head.pooling, "bias": self.head.bias is not None}
        return {
            "task": self.task,
            "version": self.version,
            "method": self.method,
            "backbone": self.fingerprint.to_dict(),
            "num_virtual_tokens": self.num_virtual_tokens,
            "dtype": self.dtype_name,
            "bytes": self.nbytes,
            "head": head,
            "training": self.training,
            "created_at": self.created_at,
        }


def _require_finite(name: str, tensor: torch.Tensor) -> None:
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise NonFiniteTensorError(f"{name}: expected finite values, got {bad} NaN/inf of {tensor.numel()}")
