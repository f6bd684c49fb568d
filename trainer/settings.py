"""TrainerSettings: the trainer process's configuration: the runtime's settings (service/runtime/settings.py, the same
PREFIXSERVE_* names as the service, so one environment configures both) and the job queue's. Read only in
`trainer.__main__`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from service.runtime.settings import RuntimeSettings


class TrainerSettings(RuntimeSettings):
    work_dir: Path = Field(Path("trainer-work"), description="checkpoints, one directory per job")
    worker_name: str | None = Field(None, description="consumer name; default host-pid")
    claim_idle_s: float = Field(60.0, gt=0, description="a job silent this long is taken over by another worker")
    heartbeat_s: float = Field(5.0, gt=0, description="how often a busy worker proves it is alive")
    max_attempts: int = Field(3, ge=1, description="deliveries of one job before it is failed")
    cancel_poll_s: float = Field(
        1.0, gt=0, description="how often a busy worker reads its job's state, to stop a cancelled job"
    )
    redis_retry_max_s: float = Field(
        5.0, gt=0, description="longest wait between two tries while Redis is unreachable (the backoff's cap)"
    )
