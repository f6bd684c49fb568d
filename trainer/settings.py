"""TrainerSettings: the trainer process's configuration (PREFIXSERVE_* variables, shared names with the service
so one environment configures both). Read only in `trainer.__main__`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.settings import DEFAULT_BACKBONE


class TrainerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PREFIXSERVE_", env_file=".env", extra="ignore")

    backbone: str = Field(DEFAULT_BACKBONE, description="the serving backbone: hub id or local directory")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    local_files_only: bool = False
    redis_url: str | None = Field(None, description="unset: the embedded Redis under data_dir (as the service)")
    data_dir: Path = Path("data")
    namespace: str = "prefixserve"
    max_artifact_bytes: int = Field(256 * 1024**2, gt=0)

    work_dir: Path = Field(Path("trainer-work"), description="checkpoints, one directory per job")
    worker_name: str | None = Field(None, description="consumer name; default host-pid")
    claim_idle_s: float = Field(60.0, gt=0, description="a job silent this long is taken over by another worker")
    heartbeat_s: float = Field(5.0, gt=0, description="how often a busy worker proves it is alive")
    max_attempts: int = Field(3, ge=1, description="deliveries of one job before it is failed")
    torch_threads: int | None = Field(None, gt=0, description="torch intra-op threads; unset keeps torch's default")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
