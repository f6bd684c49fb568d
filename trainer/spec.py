"""A training job's specification: what the CLI builds from flags and what the service queues as JSON."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from prefix_store import validate_task_name


class TrainSpec(BaseModel):
    task: str = Field(description="task name to publish under", examples=["sst2"])
    method: Literal["prefix_tuning", "p_tuning_v2", "prompt_tuning", "p_tuning"]
    data: str | None = Field(None, description="training file (JSONL, CSV, TSV) on the trainer's machine")
    examples: list[dict[str, Any]] | None = Field(None, max_length=100_000, description="inline training records")
    dev_data: str | None = Field(None, description="dev file; default: hold out dev_fraction of train")
    dev_examples: list[dict[str, Any]] | None = Field(None, max_length=100_000)
    columns: dict[str, str] | None = Field(None, description='column mapping, e.g. {"input": "mr", "output": "ref"}')
    limit: int | None = Field(None, ge=1, description="read at most this many training records")
    dev_limit: int | None = Field(500, ge=1, description="evaluate on at most this many dev examples")
    dev_fraction: float = Field(0.1, gt=0, lt=1)
    labels: list[str] | None = Field(None, description="class names in head order (default: sorted labels)")

    num_virtual_tokens: int = Field(16, ge=1, le=512)
    reparam: bool | None = Field(None, description="MLP reparametrisation (default: on for prefix_tuning only)")
    reparam_hidden: int = Field(512, ge=8, le=8192)
    prompt_encoder: Literal["lstm", "mlp"] = "lstm"
    init_text: str | None = Field(None, description="prompt tuning: initialise from this text's embeddings")

    steps: int = Field(200, ge=1, le=10_000_000)
    batch_size: int = Field(16, ge=1, le=4096)
    grad_accum: int = Field(1, ge=1, le=1024)
    lr: float = Field(5e-3, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0, le=1)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    max_length: int = Field(128, ge=4, le=8192, description="truncate inputs (and targets) to this many tokens")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="generation length at evaluation")
    eval_every: int = Field(50, ge=1)
    patience: int = Field(5, ge=1, description="stop after this many evaluations without improvement")
    checkpoint_every: int = Field(50, ge=1)
    seed: int = Field(0, ge=0)
    gate: float | None = Field(None, description="publish only if the best dev metric reaches this")
    export_peft: str | None = Field(None, description="also write a PEFT adapter directory here")

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        return validate_task_name(v)

    @model_validator(mode="after")
    def _data(self) -> TrainSpec:
        if (self.data is None) == (self.examples is None):
            raise ValueError("give exactly one of 'data' (a file) and 'examples' (inline records)")
        if self.dev_data is not None and self.dev_examples is not None:
            raise ValueError("give at most one of 'dev_data' and 'dev_examples'")
        return self
