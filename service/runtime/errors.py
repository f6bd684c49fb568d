"""Errors of the runtime: each says what was expected and what was found, and none knows about HTTP (the web layer
maps them to statuses in service/http_errors.py; the trainer reports them as they are)."""


class ServingError(Exception):
    """Base of the errors the runtime raises on purpose."""


class InputTooLong(ServingError):
    """Prefix + prompt + max new tokens do not fit the context window (or the server's token budget), or the prompt
    is empty."""


class Unsupported(ServingError):
    """A request the backbone or the task cannot serve: generation on an encoder, classification without a head."""


class QueueFull(ServingError):
    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeout(ServingError):
    """A request passed its deadline, queueing included."""


class EngineFailure(ServingError):
    """The model step itself failed (e.g. out of device memory); the requests in it are failed, not retried."""


class Overloaded(ServingError):
    """A request's CPU work (tokenising, compiling a schema, rendering a template, decoding images) did not finish
    within its budget: the server is busy with others' now (503, Retry-After)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PinRefused(ServingError):
    """Pinning a task would hold more of the device prefix cache than pins may (PREFIXSERVE_PIN_FRACTION of
    PREFIXSERVE_DEVICE_CACHE_BYTES): `needed` bytes asked for, `left` bytes the other pins leave."""

    def __init__(self, message: str, needed: int, left: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.left = left


class DeviceCacheFull(Overloaded):
    """A request's prefix fits the device prefix cache, but not beside what pinned tasks hold now, and nothing else
    would make room (no row runs, no request holds a prefix): 503 with Retry-After, as the room comes back when a pin
    goes, and another replica may have it now."""
