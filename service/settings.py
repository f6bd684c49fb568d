"""ServiceSettings: the service process's whole configuration, from PREFIXSERVE_* variables or a .env file: the
runtime's settings (service/runtime/settings.py) and the HTTP server's.

Read once in `service.__main__` (or by a test that builds it directly); nothing below the entrypoint reads the
environment.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from .runtime.settings import DEFAULT_BACKBONE, RuntimeSettings

__all__ = ["DEFAULT_BACKBONE", "ServiceSettings"]


class ServiceSettings(RuntimeSettings):
    max_body_bytes: int = Field(1024**2, gt=0, description="body limit of every non-admin route (JSON requests)")

    max_batch_size: int = Field(32, gt=0, description="most requests decoding together")
    max_batch_tokens: int = Field(
        65536, gt=0, description="most key/value tokens (prefix + prompt + max new) reserved by running requests"
    )
    max_prefill_tokens: int = Field(8192, gt=0, description="most prompt tokens prefilled in one step")
    max_queue: int = Field(1024, gt=0, description="most waiting requests; past it, 429")
    max_n: int = Field(8, ge=1, le=128, description="most outputs per prompt a request may ask for (n)")
    max_logprob_entries: int = Field(
        100_000,
        gt=0,
        description="most log-probability entries one response may carry (tokens x choices x (1 + alternatives), "
        "echoed prompts included); past it, 400 before anything runs",
    )
    device_cache_bytes: int = Field(
        1024**3, gt=0, description="device budget of prefixes' pool blocks and LoRA / IA3 tables (LRU)"
    )
    pin_fraction: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="the most of device_cache_bytes pinned tasks may hold (whole pool blocks); the rest stays for "
        "every other task and version, so pins never shut them out",
    )
    preload_tasks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated task-name globs (fnmatch: '*', '?', '[...]') whose current versions are loaded "
        "into the host and device caches at start, before /ready answers 200; stops when the device cache is full",
    )
    host_cache_bytes: int = Field(4 * 1024**3, gt=0, description="host-memory prefix LRU budget")
    request_timeout_s: float = Field(300.0, gt=0, description="deadline of a request, queueing included; past it, 504")
    template_budget_s: float = Field(
        5.0, gt=0, le=60, description="the longest a chat template may take to render (its child process is killed)"
    )
    template_memory_bytes: int = Field(
        256 * 1024**2, gt=0, description="how much a chat template's render may grow its child process"
    )
    replica_announce_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description="how often this replica announces its view (load, resident and pinned task versions) in Redis "
        "for the console's residency per replica; a view expires after three periods unannounced",
    )
    max_step_failures: int = Field(
        3,
        ge=1,
        description="engine steps failing in a row after which the process exits (status 3) for its supervisor to "
        "restart it; a device fault exits at once",
    )

    max_connections: int = Field(
        1024, gt=0, description="open connections at most; one more is closed at once, requests past it get 503"
    )
    keep_alive_timeout_s: float = Field(
        75.0, gt=0, description="idle keep-alive connections close after this (above common proxy idle timeouts)"
    )
    header_timeout_s: float = Field(15.0, gt=0, description="a request's line and headers must arrive within this")
    body_timeout_s: float = Field(30.0, gt=0, description="most seconds between two chunks of a request body")

    host: str = Field("127.0.0.1", description="bind address (the --host flag wins)")
    port: int = Field(8000, ge=0, le=65535, description="bind port (the --port flag wins)")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated bearer keys allowed to call inference routes (every task, no limits). Any "
        "key here or in admin_keys turns auth on, and with it the keys stored by POST /v1/keys; with none the service "
        "is open (every request admin, stored keys ignored) and binds only loopback addresses",
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated bearer keys allowed to call every route (turn auth on)"
    )

    otel_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP traces URL (e.g. http://collector:4318/v1/traces): traces HTTP routes and engine steps",
    )
    otel_service_name: str = Field("prefix-serve", description="the service.name of the traces")
    adapter_dirs: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description='comma-separated directories from which PUT /v1/tasks/{task} may take {"source": path}; '
        "empty: no local sources",
    )

    @field_validator("api_keys", "admin_keys", "adapter_dirs", "preload_tasks", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @property
    def auth_enabled(self) -> bool:
        """Keys from the environment turn auth on; stored keys (POST /v1/keys) count only then."""
        return bool(self.api_keys or self.admin_keys)
