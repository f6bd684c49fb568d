"""Errors raised by the prefix store and the artifact codec.

Every message says what was expected and what was found, so the service can hand it to the caller as is.
"""


class PrefixStoreError(Exception):
    """Base class of everything this package raises on purpose."""


class ArtifactError(PrefixStoreError, ValueError):
    """An artifact (or an uploaded adapter) is not acceptable. Nothing was stored."""


class InvalidTaskName(ArtifactError):
    pass


class ArtifactFormatError(ArtifactError):
    """Bytes that are not a well-formed artifact: not safetensors, pickle, bad header, missing fields."""


class ArtifactShapeError(ArtifactError):
    """Tensor shapes disagree with the metadata or with the backbone geometry."""


class NonFiniteTensorError(ArtifactError):
    pass


class ChecksumMismatch(ArtifactError):
    pass


class ArtifactTooLarge(ArtifactError):
    pass


class UnsupportedAdapter(ArtifactError):
    """A PEFT adapter of a type or layout that prefix-serve cannot serve."""


class BackboneMismatch(ArtifactError):
    """A prefix was made for a different backbone than the one it is checked against."""


class TaskNotFound(PrefixStoreError, LookupError):
    pass


class VersionNotFound(PrefixStoreError, LookupError):
    pass


class VersionConflict(PrefixStoreError):
    """The operation would leave the task without a current version (e.g. deleting the current one)."""


class StoreUnavailable(PrefixStoreError):
    """Redis could not be reached or timed out; raised after retries for reads, at once for writes."""


class StoredArtifactCorrupt(PrefixStoreError):
    """A version in the store does not decode. Uploads are validated before they are stored, so this is the server's
    fault (a corrupted record, a codec bug, a lowered size limit), never the client's."""
