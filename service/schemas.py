"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class HeadInfo(BaseModel):
    labels: list[str]
    pooling: str
    bias: bool


class VersionSummary(BaseModel):
    """One stored version, without its tensors."""

    task: str
    version: int
    method: str = Field(description="prefix_tuning | p_tuning_v2 | prompt_tuning | p_tuning")
    backbone: dict[str, Any] = Field(description="fingerprint of the backbone the prefix was made for")
    num_virtual_tokens: int
    dtype: str
    bytes: int = Field(description="size of the prefix and head tensors")
    head: HeadInfo | None = None
    training: dict[str, Any] = Field(default_factory=dict, description="dataset, metrics, source, ...")
    created_at: str

    model_config = {
        "json_schema_extra": {
            "example": {
                "task": "sst2",
                "version": 3,
                "method": "p_tuning_v2",
                "backbone": {
                    "model_type": "bert",
                    "num_layers": 6,
                    "hidden_size": 384,
                    "num_attention_heads": 12,
                    "num_kv_heads": 12,
                    "head_dim": 32,
                    "vocab_size": 30522,
                    "digest": "7e2a41edb43fa8d7",
                },
                "num_virtual_tokens": 16,
                "dtype": "float32",
                "bytes": 1181448,
                "head": {"labels": ["negative", "positive"], "pooling": "pooler", "bias": True},
                "training": {"dataset": "sst2/train.tsv", "metrics": {"accuracy": 0.88}},
                "created_at": "2026-11-23T22:00:00+00:00",
            }
        }
    }


class TaskInfo(BaseModel):
    task: str
    current_version: int
    versions: list[int]
    resident: bool = Field(description="the current version is in this replica's device prefix cache")
    current: VersionSummary


class TaskDetail(TaskInfo):
    history: list[VersionSummary] = Field(description="every stored version, oldest first")


class TaskList(BaseModel):
    tasks: list[TaskInfo]


class RollbackRequest(BaseModel):
    version: int = Field(ge=1, description="an existing version to make current", examples=[2])


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, bool | str]
    backbone: dict[str, Any] | None = None
