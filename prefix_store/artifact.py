"""The prefix artifact: one self-describing record per task version.

Which tensors an artifact carries is its method's (prefix_store/methods.py, which gives their shapes); the fields:
`kv` (L, 2, H_kv, P, D), index 0 = keys, 1 = values; `soft_prompt` (P, hidden), input embeddings (text) or prompt
tokens inserted after [CLS] (images); `deep_prompt` (L, P, hidden), layer i's visual prompt tokens; `biases`, per
module path a delta (out,) added to that module's bias (tuned - base); `low_rank` (LoRA), per module path the
factors A (r, in) and B (out, r) and a scale s, the module's output gaining `x A^T B^T s`; `scales` (IA3), per module
path a vector scaling its output (out,) or its input (in,). A head is linear (weight over a pooled state)
or a verbalizer (one vocabulary token per label, scored at the [MASK] position); a `template` ("{text} [MASK]") says
how the task writes its input. An artifact that exists has passed validation: constructing one checks every
invariant below.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ArtifactFormatError, ArtifactShapeError, BackboneMismatch, InvalidTaskName, NonFiniteTensorError
from .methods import METHODS, REGISTRY, Method

PREFIX_FIELDS = ("kv", "soft_prompt", "deep_prompt")  # the artifact's prompt tensors; at most one per artifact
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
POOLINGS = ("pooler", "cls", "mean", "last_token", "mask")  # "mask": a verbalizer reads the [MASK] position
MAX_BIAS_MODULES = 4096
MAX_ADAPTED_MODULES = 4096  # low_rank / scales: modules one artifact adapts (a 64-layer model's all-linear is 448)
MAX_TEMPLATE_CHARS = 1000
MAX_CHAT_TEMPLATE_CHARS = 64 * 1024  # Llama 3's is 4 KB, the longest common ones about 10 KB
# (task, version) names one stored version's tensors: versions are immutable and their numbers never reused, so every
# cache tier keys by it.
VersionKey = tuple[str, int]

_TASK_NAME = re.compile(r"[a-z0-9._-]{1,64}")
_MODULE_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
MAX_MODULE_PATH_CHARS = 200


def is_module_path(path: object) -> bool:
    """A module path as artifacts store them: dotted names of letters, digits and '_', at most 200 characters."""
    return isinstance(path, str) and len(path) <= MAX_MODULE_PATH_CHARS and bool(_MODULE_PATH.fullmatch(path))


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
            least = 0 if f.name == "vocab_size" else 1  # image backbones have no vocabulary
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise ArtifactFormatError(f"fingerprint {f.name}: expected an int >= {least}, got {value!r}")
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
            vocab_size=getattr(config, "vocab_size", 0) or 0,  # image backbones have none
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
    """A per-task head: linear over a pooled hidden state, or a verbalizer.

    weight (C, hidden), bias (C,): the linear head (None for a verbalizer).
    labels: C names, index i names row i of weight (or token_ids[i]).
    pooling: "pooler" (BERT pooler output), "cls", "mean", "last_token" (causal LMs), or "mask" for a verbalizer.
    token_ids: a verbalizer's C vocabulary tokens: label i scores as token_ids[i] at the [MASK] position.
    """

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    labels: list[str]
    pooling: str
    token_ids: list[int] | None = None

    @property
    def verbalizer(self) -> bool:
        return self.token_ids is not None


@dataclass(frozen=True)
class LowRank:
    """One module's LoRA update: its output gains `(x A^T) B^T * scale`.

    a: (r, in) PEFT's lora_A.weight; b: (out, r) its lora_B.weight; scale: lora_alpha / r (lora_alpha / sqrt(r) with
    rsLoRA), per module (PEFT's alpha_pattern and rank_pattern give modules their own).
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class ChannelScale:
    """One module's IA3 vector: its output multiplied by it channel by channel (out,), or, for a feed-forward module
    (`on_input`), its input (in,) before the projection."""

    vector: torch.Tensor
    on_input: bool = False


@dataclass
class PrefixArtifact:
    """One version of one task's prefix.

    Args:
        task: validated task name.
        version: assigned by the store on publish; None before.
        method: one of METHODS (prefix_store/methods.py), which says which tensors below it carries.
        fingerprint: the backbone the prefix was trained on.
        kv: (L, 2, H_kv, P, D) key/values, or None.
        soft_prompt: (P, hidden) prompt embeddings, or None.
        deep_prompt: (L, P, hidden) per-layer visual prompt tokens, or None.
        head: optional classification head, same dtype as the prefix.
        biases: module path -> bias delta (out,), e.g. "encoder.layer.0.attention.self.query"
            (transformers' parameter names without the base model's prefix and the ".bias").
        low_rank: module path -> its LoRA factors (LowRank), paths as for `biases`.
        scales: module path -> its IA3 vector (ChannelScale), paths as for `biases`.
        template: how the task writes its input for the backbone, with "{text}" (and "{text_pair}"), e.g.
            "{text} [MASK]" (null prompts); None: the text as it comes.
        chat_template: a Jinja chat template (transformers' format) for /v1/chat/completions on this task; None:
            the backbone tokenizer's own.
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
    biases: dict[str, torch.Tensor] | None = None
    template: str | None = None
    deep_prompt: torch.Tensor | None = None
    chat_template: str | None = None
    low_rank: dict[str, LowRank] | None = None
    scales: dict[str, ChannelScale] | None = None

    def __post_init__(self) -> None:
        validate_task_name(self.task)
        if self.method not in METHODS:
            raise ArtifactFormatError(f"unknown method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.version is not None and (not isinstance(self.version, int) or self.version < 1):
            raise ArtifactFormatError(f"version: expected a positive int or None, got {self.version!r}")
        self._check_prefix_tensor()
        self._check_biases()
        self._check_low_rank()
        self._check_scales()
        if self.head is not None:
            self._check_head(self.head)
        if self.template is not None:
            check_template(self.template)
        if self.chat_template is not None:
            check_chat_template(self.chat_template)
        try:
            json.dumps(self.training)
        except (TypeError, ValueError) as e:
            raise ArtifactFormatError(f"training metadata is not JSON-serialisable: {e}") from None

    # -- validation -----------------------------------------------------------------------------------------------
    def _check_prefix_tensor(self) -> None:
        spec = self.spec
        present = {n for n in PREFIX_FIELDS if getattr(self, n) is not None}
        required = {t.field for t in spec.tensors if t.field in PREFIX_FIELDS}
        allowed = required | {t.field for t in spec.optional if t.field in PREFIX_FIELDS}
        if not required <= present or present - allowed:
            want = " and ".join(repr(f) for f in sorted(required)) or "no prompt tensor"
            extra = " or ".join(repr(f) for f in sorted(allowed - required))
            also = f", optionally {extra}" if extra else ""
            raise ArtifactFormatError(f"method {self.method} carries {want}{also}; got {sorted(present)}")
        shapes = {t.field: t.shape for t in spec.tensors + spec.optional}
        fp = self.fingerprint
        for name in sorted(present):
            tensor = getattr(self, name)
            if tensor.dtype not in DTYPES.values():
                raise ArtifactFormatError(f"{name} dtype: expected one of {', '.join(DTYPES)}, got {tensor.dtype}")
            expected = {
                "kv": (fp.num_layers, 2, fp.num_kv_heads, None, fp.head_dim),
                "soft_prompt": (None, fp.hidden_size),
                "deep_prompt": (fp.num_layers, None, fp.hidden_size),
            }[name]
            shape = tuple(tensor.shape)
            if len(shape) != len(expected) or any(e not in (None, s) for e, s in zip(expected, shape, strict=True)):
                want_shape = tuple("P" if e is None else e for e in expected)
                raise ArtifactShapeError(f"{name} shape: expected {shapes[name]} = {want_shape}, got {shape}")
            if self.num_virtual_tokens < 1:
                raise ArtifactShapeError(
                    f"{name}: expected at least one virtual token, got P = {self.num_virtual_tokens}"
                )
            _require_finite(name, tensor)

    def _check_biases(self) -> None:
        if "biases" not in self.spec.fields:
            if self.biases is not None:
                raise ArtifactFormatError(f"method {self.method} carries no bias deltas")
            return
        if not self.biases or not isinstance(self.biases, dict):
            raise ArtifactFormatError(f"method {self.method}: expected at least one bias delta")
        self.biases = dict(sorted(self.biases.items()))  # one canonical order: encoding is deterministic
        if len(self.biases) > MAX_BIAS_MODULES:
            raise ArtifactShapeError(f"biases: at most {MAX_BIAS_MODULES} modules, got {len(self.biases)}")
        dtypes = {t.dtype for t in self.biases.values()} | ({self.kv.dtype} if self.kv is not None else set())
        if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPES.values():
            got = sorted(map(str, dtypes))
            raise ArtifactFormatError(f"biases: expected one dtype among {', '.join(DTYPES)}, got {got}")
        for path, t in self.biases.items():
            if not isinstance(path, str) or len(path) > 200 or not _MODULE_PATH.fullmatch(path):
                raise ArtifactFormatError(f"bias module path {path!r:.80}: expected dotted module names")
            if t.ndim != 1 or t.numel() < 1:
                raise ArtifactShapeError(f"bias delta {path}: expected a vector (out,), got shape {tuple(t.shape)}")
            _require_finite(f"bias delta {path}", t)

    def _check_modules(self, name: str, modules: dict[str, Any] | None, dtypes: set[torch.dtype]) -> bool:
        """The checks every per-module field shares (present iff the method carries it, paths, size, one dtype);
        False when the method does not carry it."""
        if name not in self.spec.fields:
            if modules is not None:
                raise ArtifactFormatError(f"method {self.method} carries no {name}")
            return False
        if not modules or not isinstance(modules, dict):
            raise ArtifactFormatError(f"method {self.method}: expected {name} for at least one module")
        if len(modules) > MAX_ADAPTED_MODULES:
            raise ArtifactShapeError(f"{name}: at most {MAX_ADAPTED_MODULES} modules, got {len(modules)}")
        for path in modules:
            if not is_module_path(path):
                raise ArtifactFormatError(f"{name} module path {path!r:.80}: expected dotted module names")
        if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPES.values():
            got = sorted(map(str, dtypes))
            raise ArtifactFormatError(f"{name}: expected one dtype among {', '.join(DTYPES)}, got {got}")
        return True

    def _check_low_rank(self) -> None:
        factors = self.low_rank
        dtypes = {t.dtype for f in (factors or {}).values() for t in (f.a, f.b)}
        if not self._check_modules("low_rank", factors, dtypes):
            return
        assert factors is not None
        self.low_rank = dict(sorted(factors.items()))  # one canonical order: encoding is deterministic
        for path, f in self.low_rank.items():
            a, b = f.a, f.b
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] < 1 or b.shape[1] != a.shape[0] or 0 in (a.numel(), b.numel()):
                raise ArtifactShapeError(
                    f"low_rank {path}: expected A (r, in) and B (out, r) with r >= 1, got A {tuple(a.shape)}, "
                    f"B {tuple(b.shape)}"
                )
            scale = f.scale
            if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
                raise ArtifactFormatError(f"low_rank {path} scale: expected a finite number, got {scale!r:.40}")
            _require_finite(f"low_rank {path} A", a)
            _require_finite(f"low_rank {path} B", b)

    def _check_scales(self) -> None:
        scales = self.scales
        if not self._check_modules("scales", scales, {s.vector.dtype for s in (scales or {}).values()}):
            return
        assert scales is not None
        self.scales = dict(sorted(scales.items()))
        for path, s in self.scales.items():
            if s.vector.ndim != 1 or s.vector.numel() < 1 or not isinstance(s.on_input, bool):
                raise ArtifactShapeError(
                    f"scales {path}: expected a vector (out,) or (in,) and whether it scales the input, got shape "
                    f"{tuple(s.vector.shape)}, on_input={s.on_input!r:.20}"
                )
            _require_finite(f"scales {path}", s.vector)

    def _check_head(self, head: ClassificationHead) -> None:
        num_labels = len(head.labels)
        if num_labels < 1 or len(set(head.labels)) != num_labels or not all(isinstance(x, str) for x in head.labels):
            raise ArtifactFormatError(f"head labels: expected distinct strings, got {head.labels!r:.200}")
        if head.pooling not in POOLINGS:
            raise ArtifactFormatError(f"head pooling {head.pooling!r}: expected one of {', '.join(POOLINGS)}")
        if head.verbalizer:
            self._check_verbalizer(head)
            return
        if head.weight is None or head.pooling == "mask":
            raise ArtifactFormatError("head: a linear head needs a weight and a pooling other than 'mask'")
        want = (num_labels, self.fingerprint.hidden_size)
        if tuple(head.weight.shape) != want:
            got = tuple(head.weight.shape)
            raise ArtifactShapeError(f"head.weight shape: expected (C, hidden) = {want}, got {got}")
        if head.bias is not None and tuple(head.bias.shape) != (num_labels,):
            raise ArtifactShapeError(f"head.bias shape: expected (C,) = ({num_labels},), got {tuple(head.bias.shape)}")
        for name, t in (("head.weight", head.weight), ("head.bias", head.bias)):
            if t is None:
                continue
            if t.dtype != self.dtype:
                raise ArtifactFormatError(f"{name} dtype: expected {self.dtype_name} like the prefix, got {t.dtype}")
            _require_finite(name, t)

    def _check_verbalizer(self, head: ClassificationHead) -> None:
        ids = head.token_ids or []
        vocab = self.fingerprint.vocab_size
        if head.weight is not None or head.bias is not None or head.pooling != "mask":
            raise ArtifactFormatError("verbalizer head: expected token ids only, pooling 'mask', no weight or bias")
        if len(ids) != len(head.labels):
            raise ArtifactShapeError(f"verbalizer: expected one token per label ({len(head.labels)}), got {len(ids)}")
        bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab]
        if bad:
            raise ArtifactFormatError(f"verbalizer token ids: expected ids in [0, {vocab}), got {bad[:5]}")
        if len(set(ids)) != len(ids):
            raise ArtifactFormatError(f"verbalizer token ids: expected one distinct token per label, got {ids}")

    # -- derived --------------------------------------------------------------------------------------------------
    @property
    def spec(self) -> Method:
        """The artifact's method: its family, the tensors it carries, the backbones it serves on."""
        return REGISTRY[self.method]

    @property
    def key(self) -> VersionKey:
        """(task, version): what caches key a stored version by (versions are immutable and never renumbered)."""
        if self.version is None:
            raise ValueError(f"artifact of {self.task!r} has no version yet: only stored versions have a key")
        return (self.task, self.version)

    @property
    def prefix_tensor(self) -> torch.Tensor | None:
        """The key/value prefix, the soft prompt or the deep visual prompts; None for a bias-only artifact."""
        for t in (self.kv, self.soft_prompt, self.deep_prompt):
            if t is not None:
                return t
        return None

    @property
    def num_virtual_tokens(self) -> int:
        if self.kv is not None:
            return self.kv.shape[3]
        if self.deep_prompt is not None:
            return self.deep_prompt.shape[1]
        return self.soft_prompt.shape[0] if self.soft_prompt is not None else 0

    @property
    def dtype(self) -> torch.dtype:
        t = self.prefix_tensor
        if t is None and self.biases:
            t = next(iter(self.biases.values()))
        if t is None and self.low_rank:
            t = next(iter(self.low_rank.values())).a
        if t is None and self.scales:
            t = next(iter(self.scales.values())).vector
        assert t is not None, "an artifact carries a prefix, bias deltas, low-rank factors or scales"
        return t.dtype

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the artifact carries."""
        out = [t for t in (self.kv, self.soft_prompt, self.deep_prompt) if t is not None]
        out += list((self.biases or {}).values())
        out += [t for f in (self.low_rank or {}).values() for t in (f.a, f.b)]
        out += [s.vector for s in (self.scales or {}).values()]
        if self.head is not None:
            out += [t for t in (self.head.weight, self.head.bias) if t is not None]
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def with_task(self, task: str) -> PrefixArtifact:
        return self if task == self.task else dataclasses.replace(self, task=validate_task_name(task))

    def to(self, dtype: torch.dtype) -> PrefixArtifact:
        """A copy with every tensor cast to `dtype` (e.g. fp32 PEFT import served in bf16)."""

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dtype)

        head = self.head
        if head is not None:
            head = dataclasses.replace(head, weight=cast(head.weight), bias=cast(head.bias))
        biases = None if self.biases is None else {k: v.to(dtype) for k, v in self.biases.items()}
        low_rank = None
        if self.low_rank is not None:
            low_rank = {k: LowRank(f.a.to(dtype), f.b.to(dtype), f.scale) for k, f in self.low_rank.items()}
        scales = None
        if self.scales is not None:
            scales = {k: ChannelScale(s.vector.to(dtype), s.on_input) for k, s in self.scales.items()}
        return dataclasses.replace(
            self,
            kv=cast(self.kv),
            soft_prompt=cast(self.soft_prompt),
            deep_prompt=cast(self.deep_prompt),
            head=head,
            biases=biases,
            low_rank=low_rank,
            scales=scales,
        )

    def summary(self) -> dict[str, Any]:
        """Everything but the tensors: what listing endpoints show without loading the prefix."""
        head = None
        if self.head is not None:
            head = {"labels": list(self.head.labels), "pooling": self.head.pooling, "bias": self.head.bias is not None}
            if self.head.verbalizer:
                head["token_ids"] = list(self.head.token_ids or [])
        extra: dict[str, Any] = {}
        if self.biases is not None:
            extra["bias_modules"] = sorted(self.biases)
        if self.low_rank is not None:
            extra["lora_modules"] = {k: {"rank": f.rank, "scale": f.scale} for k, f in self.low_rank.items()}
        if self.scales is not None:
            extra["scaled_modules"] = {k: "input" if s.on_input else "output" for k, s in self.scales.items()}
        if self.template is not None:
            extra["template"] = self.template
        if self.chat_template is not None:
            extra["chat_template"] = self.chat_template
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
            **extra,
        }


def check_template(template: object) -> str:
    """A task's input template: at most MAX_TEMPLATE_CHARS, with the field {text} and optionally {text_pair}."""
    import string

    if not isinstance(template, str) or len(template) > MAX_TEMPLATE_CHARS:
        raise ArtifactFormatError(f"template: expected a string of at most {MAX_TEMPLATE_CHARS} characters")
    try:
        parts = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ArtifactFormatError(f"template {template!r:.80}: {e}") from None
    if any(spec or conv for _, spec, conv in parts):
        raise ArtifactFormatError(f"template {template!r:.80}: expected plain fields, without conversions or specs")
    fields = {f for f, _, _ in parts}
    if "text" not in fields or fields - {"text", "text_pair"}:
        raise ArtifactFormatError(
            f"template {template!r:.80}: expected the field {{text}} and optionally {{text_pair}}, got {sorted(fields)}"
        )
    return template


def check_chat_template(template: object) -> str:
    """A task's chat template: a string of at most MAX_CHAT_TEMPLATE_CHARS that Jinja parses (it is rendered in
    transformers' sandboxed environment when a chat request comes)."""
    if not isinstance(template, str) or not template.strip() or len(template) > MAX_CHAT_TEMPLATE_CHARS:
        raise ArtifactFormatError(
            f"chat_template: expected a non-empty string of at most {MAX_CHAT_TEMPLATE_CHARS} chars"
        )
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(template)
    except TemplateSyntaxError as e:
        raise ArtifactFormatError(f"chat_template: not a valid Jinja template (line {e.lineno}: {e.message})") from None
    return template


def render_template(template: str | None, text: str, text_pair: str | None) -> tuple[str, str | None]:
    """A task's input as the backbone reads it: (text, text_pair) through the task's template. A template with
    {text_pair} makes one sequence of both; one with only {text} leaves the pair as the second segment."""
    if template is None:
        return text, text_pair
    if "{text_pair}" in template:
        return template.format(text=text, text_pair=text_pair or ""), None
    return template.format(text=text), text_pair


def _require_finite(name: str, tensor: torch.Tensor) -> None:
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise NonFiniteTensorError(f"{name}: expected finite values, got {bad} NaN/inf of {tensor.numel()}")
