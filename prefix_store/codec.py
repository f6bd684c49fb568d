"""Artifact <-> bytes: a safetensors file whose header metadata holds the artifact's JSON description.

Layout: tensors "kv" (L, 2, H_kv, P, D), "soft_prompt" (P, hidden) or "deep_prompt" (L, P, hidden),
"bias.<module path>" (out,) for bias deltas (with or without "kv"), "lora.<module path>.A" (r, in) and
"lora.<module path>.B" (out, r) for LoRA factors (each module's scale in the metadata's lora_modules),
"scale.<module path>" for IA3 vectors (the metadata's scaled_modules says which scale an input), optionally
"head.weight" (C, hidden) and "head.bias" (C,) (a verbalizer head has its token ids in the metadata instead);
`__metadata__["prefix_serve"]` is the JSON of `PrefixArtifact.summary()` plus a format version and a sha256
checksum of the tensor bytes. Decoding never unpickles: uploaded bytes are parsed as a safetensors header first and
everything is checked before an artifact is built.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .artifact import BackboneFingerprint, ChannelScale, ClassificationHead, LowRank, PrefixArtifact
from .errors import ArtifactFormatError, ArtifactTooLarge, ChecksumMismatch

FORMAT = "prefix-serve/1"
METADATA_KEY = "prefix_serve"
DEFAULT_MAX_BYTES = 256 * 1024**2
_MAX_HEADER_BYTES = 1024**2
_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def encode(artifact: PrefixArtifact) -> bytes:
    tensors = _tensors_of(artifact)
    meta = artifact.summary()
    meta.update(format=FORMAT, checksum=checksum(tensors))
    return st_save(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> PrefixArtifact:
    """Parses and validates bytes into an artifact, raising a specific ArtifactError for each kind of fault."""
    header = read_safetensors_header(data, max_bytes=max_bytes)
    raw_meta = header.pop("__metadata__", None) or {}
    if METADATA_KEY not in raw_meta:
        raise ArtifactFormatError(
            f"safetensors file has no '{METADATA_KEY}' metadata: expected a prefix-serve artifact "
            "(a PEFT adapter must be uploaded as adapter_config + adapter_model)"
        )
    meta = parse_json(raw_meta[METADATA_KEY], "artifact metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ArtifactFormatError(f"artifact format: expected {FORMAT!r}, got {got!r}")
    tensors = load_tensors(data)
    if meta.get("checksum") != checksum(tensors):
        raise ChecksumMismatch(f"tensor checksum: metadata says {meta.get('checksum')}, bytes give {checksum(tensors)}")
    artifact = _artifact_from(meta, tensors)
    _check_summary(meta, artifact)
    return artifact


def read_safetensors_header(data: bytes, *, max_bytes: int) -> dict[str, Any]:
    """The parsed JSON header of a safetensors blob, after size, header and dtype checks.

    The first 8 bytes are the little-endian length of the JSON header, so they can be anything (one header length in
    32 starts with 0x80, a pickle's first byte): a blob is only called a pickle or a zip archive once it has failed
    to parse as safetensors, to say what it was instead.
    """
    if len(data) > max_bytes:
        raise ArtifactTooLarge(f"artifact is {len(data)} bytes: the limit is {max_bytes}")
    try:
        header = _parse_header(data)
    except ArtifactFormatError as e:
        kind = "a pickle" if data[:1] == b"\x80" else "a zip archive (torch.save)" if data[:2] == b"PK" else None
        if kind is None:
            raise
        raise ArtifactFormatError(f"expected a safetensors file, got {kind}: pickled tensors are never loaded") from e
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in _ST_DTYPES:
            dt = info.get("dtype") if isinstance(info, dict) else info
            want = sorted(_ST_DTYPES)
            raise ArtifactFormatError(f"tensor {name!r:.80} dtype: expected one of {want}, got {dt!r:.40}")
    return header


def _parse_header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise ArtifactFormatError(f"expected a safetensors file, got {len(data)} bytes (too short for a header)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(_MAX_HEADER_BYTES, len(data) - 8):
        # The length is the file's first 8 bytes: not echoed (the file may not be a safetensors file at all).
        raise ArtifactFormatError(f"expected a safetensors file: its header length is impossible for {len(data)} bytes")
    header = parse_json(data[8 : 8 + n], "safetensors header")
    if not isinstance(header, dict):
        raise ArtifactFormatError("expected a safetensors file, header is not a JSON object")
    return header


def parse_json(raw: bytes | str, what: str) -> Any:
    """json.loads with every failure, nesting too deep for the parser included, as an ArtifactFormatError."""
    try:
        return json.loads(raw)
    except UnicodeDecodeError as e:  # its message would quote the offending byte
        raise ArtifactFormatError(f"{what} is not valid JSON: not UTF-8 (at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ArtifactFormatError(f"{what} is not valid JSON: {e}") from None
    except RecursionError:
        raise ArtifactFormatError(f"{what}: JSON nested too deeply") from None


def load_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Tensors of a blob whose header `read_safetensors_header` has already accepted."""
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ArtifactFormatError(f"corrupt safetensors data: {e}") from None


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over name, dtype, shape and raw bytes of each tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


BIAS_PREFIX = "bias."  # tensor "bias.<module path>": that module's bias delta
LORA_PREFIX = "lora."  # tensors "lora.<module path>.A" and ".B": that module's LoRA factors
SCALE_PREFIX = "scale."  # tensor "scale.<module path>": that module's IA3 vector


def _tensors_of(artifact: PrefixArtifact) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    if artifact.kv is not None:
        tensors["kv"] = artifact.kv
    if artifact.soft_prompt is not None:
        tensors["soft_prompt"] = artifact.soft_prompt
    if artifact.deep_prompt is not None:
        tensors["deep_prompt"] = artifact.deep_prompt
    for path, delta in (artifact.biases or {}).items():
        tensors[BIAS_PREFIX + path] = delta
    for path, f in (artifact.low_rank or {}).items():
        tensors[f"{LORA_PREFIX}{path}.A"] = f.a
        tensors[f"{LORA_PREFIX}{path}.B"] = f.b
    for path, sc in (artifact.scales or {}).items():
        tensors[SCALE_PREFIX + path] = sc.vector
    if artifact.head is not None and artifact.head.weight is not None:
        tensors["head.weight"] = artifact.head.weight
        if artifact.head.bias is not None:
            tensors["head.bias"] = artifact.head.bias
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _artifact_from(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PrefixArtifact:
    head_meta = meta.get("head")
    bias_modules = meta.get("bias_modules")
    expected: set[str] = {name for name in ("kv", "soft_prompt", "deep_prompt") if name in tensors}
    if bias_modules is not None:
        if not isinstance(bias_modules, list) or not all(isinstance(m, str) for m in bias_modules):
            raise ArtifactFormatError("metadata bias_modules: expected a list of module paths")
        expected |= {BIAS_PREFIX + m for m in bias_modules}
    lora_modules, scaled_modules = _module_map(meta, "lora_modules", dict), _module_map(meta, "scaled_modules", str)
    expected |= {f"{LORA_PREFIX}{m}.{x}" for m in lora_modules or {} for x in "AB"}
    expected |= {SCALE_PREFIX + m for m in scaled_modules or {}}
    if not expected:
        expected = {"kv or soft_prompt"}
    if head_meta and not head_meta.get("token_ids"):
        expected |= {"head.weight"} | ({"head.bias"} if head_meta.get("bias") else set())
    if set(tensors) != expected:
        names = sorted(tensors)
        raise ArtifactFormatError(f"tensors: expected {sorted(expected)[:20]}, got {names[:20]} ({len(names)} tensors)")
    try:
        head = None
        if head_meta:
            head = ClassificationHead(
                weight=tensors.get("head.weight"),
                bias=tensors.get("head.bias"),
                labels=list(head_meta["labels"]),
                pooling=head_meta["pooling"],
                token_ids=list(head_meta["token_ids"]) if head_meta.get("token_ids") else None,
            )
        biases = None
        if bias_modules is not None:
            biases = {m: tensors[BIAS_PREFIX + m] for m in bias_modules}
        low_rank = None
        if lora_modules is not None:
            low_rank = {
                m: LowRank(tensors[f"{LORA_PREFIX}{m}.A"], tensors[f"{LORA_PREFIX}{m}.B"], info["scale"])
                for m, info in lora_modules.items()
            }
        scales = None
        if scaled_modules is not None:
            scales = {m: ChannelScale(tensors[SCALE_PREFIX + m], side == "input") for m, side in scaled_modules.items()}
        return PrefixArtifact(
            task=meta["task"],
            version=meta["version"],
            method=meta["method"],
            fingerprint=BackboneFingerprint.from_dict(meta["backbone"]),
            kv=tensors.get("kv"),
            soft_prompt=tensors.get("soft_prompt"),
            deep_prompt=tensors.get("deep_prompt"),
            head=head,
            training=meta.get("training") or {},
            created_at=meta.get("created_at") or "",
            biases=biases,
            low_rank=low_rank,
            scales=scales,
            template=meta.get("template"),
            chat_template=meta.get("chat_template"),
        )
    except (KeyError, TypeError) as e:
        raise ArtifactFormatError(f"artifact metadata is missing or mistypes field {e}") from None


def _module_map(meta: dict[str, Any], key: str, kind: type) -> dict[str, Any] | None:
    """The metadata's per-module description `key` (module path -> `kind`), None when absent."""
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(m, str) and isinstance(v, kind) for m, v in value.items()):
        raise ArtifactFormatError(f"metadata {key}: expected an object of module path -> {kind.__name__}")
    return value


def _check_summary(meta: dict[str, Any], artifact: PrefixArtifact) -> None:
    """The metadata restates P, dtype, LoRA ranks and IA3 sides; a disagreement means the record was edited or
    mis-built."""
    for key, actual in (("num_virtual_tokens", artifact.num_virtual_tokens), ("dtype", artifact.dtype_name)):
        if meta.get(key) != actual:
            raise ArtifactFormatError(f"metadata {key}: says {meta.get(key)!r}, tensors have {actual!r}")
    summary = artifact.summary()
    for key in ("lora_modules", "scaled_modules"):  # ranks and sides, as the tensors and metadata make them
        if meta.get(key) != summary.get(key):
            raise ArtifactFormatError(f"metadata {key}: does not describe the artifact's tensors")
