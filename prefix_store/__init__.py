"""Prefix artifacts, their codec, PEFT interchange, and the Redis store that versions them."""

from .artifact import (
    KV_METHODS,
    METHODS,
    SOFT_PROMPT_METHODS,
    BackboneFingerprint,
    ClassificationHead,
    PrefixArtifact,
    validate_task_name,
)
from .codec import decode, encode
from .embedded import EmbeddedRedis
from .errors import (
    ArtifactError,
    ArtifactFormatError,
    ArtifactShapeError,
    ArtifactTooLarge,
    BackboneMismatch,
    ChecksumMismatch,
    InvalidTaskName,
    NonFiniteTensorError,
    PrefixStoreError,
    StoredArtifactCorrupt,
    StoreUnavailable,
    TaskNotFound,
    UnsupportedAdapter,
    VersionConflict,
    VersionNotFound,
)
from .peft_io import export_peft_adapter, import_peft_adapter, import_peft_dir
from .store import PrefixStore, StoreEvent, TaskInfo, connect, open_store

__all__ = [
    "KV_METHODS",
    "METHODS",
    "SOFT_PROMPT_METHODS",
    "ArtifactError",
    "ArtifactFormatError",
    "ArtifactShapeError",
    "ArtifactTooLarge",
    "BackboneFingerprint",
    "BackboneMismatch",
    "ChecksumMismatch",
    "ClassificationHead",
    "EmbeddedRedis",
    "InvalidTaskName",
    "NonFiniteTensorError",
    "PrefixArtifact",
    "PrefixStore",
    "PrefixStoreError",
    "StoreEvent",
    "StoreUnavailable",
    "StoredArtifactCorrupt",
    "TaskInfo",
    "TaskNotFound",
    "UnsupportedAdapter",
    "VersionConflict",
    "VersionNotFound",
    "connect",
    "open_store",
    "validate_task_name",
    "decode",
    "encode",
    "export_peft_adapter",
    "import_peft_adapter",
    "import_peft_dir",
]
