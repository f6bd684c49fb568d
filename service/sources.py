"""Adapters by reference: `PUT /v1/tasks/{task}` with `{"source": ...}` instead of an upload. A source is a Hugging
Face Hub repository (fetched with huggingface_hub, which honours HF_HUB_OFFLINE and its cache) or a directory or
file under one of the directories PREFIXSERVE_ADAPTER_DIRS allows. Either way the files found go through the same
checks as an upload: a PEFT directory (adapter_config.json + adapter_model.safetensors) or a prefix-serve artifact.
"""

from __future__ import annotations

import os
import re
import stat
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from prefix_store.jobs import inside
from prefix_store.methods import PeftMethodName

from .http_errors import BadRequest, Forbidden, PayloadTooLarge, SourceNotFound, SourceUnavailable

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
READ_BUDGET_S = 30.0  # reading one adapter's files from a local directory
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class SourceUpload(BaseModel):
    model_config = {"extra": "forbid"}
    source: str = Field(max_length=1024, description="a hub repository id (owner/name) or an absolute path")
    kind: Literal["hub", "path"] | None = Field(None, description="default: path when absolute, else hub")
    revision: str | None = Field(None, max_length=128, description="hub: a branch, tag or commit")
    subfolder: str | None = Field(None, max_length=256, description="hub: the adapter's folder in the repository")
    labels: list[str] | None = Field(None, max_length=1024)
    method: PeftMethodName | None = Field(
        None, description="which method a PEFT adapter holds, where its peft_type fits several (PREFIX_TUNING)"
    )
    chat_template: str | None = Field(None, max_length=65536)


def local_files(source: str, allowed: list[str]) -> Path:
    """The file or directory `source` names, once it is known to lie inside an allowed directory (symbolic links
    and .. resolved first). Raises Forbidden outside them, SourceNotFound when nothing is there."""
    if not allowed:
        raise Forbidden("local sources are off: the server allows no directory (PREFIXSERVE_ADAPTER_DIRS)")
    path = Path(source)
    if not path.is_absolute():
        raise BadRequest(f"source: a path must be absolute, got {source!r}")
    resolved = path.resolve()
    if not inside(resolved, [Path(d).resolve() for d in allowed]):
        raise Forbidden(f"source {source!r} is outside the directories this server allows")
    if not resolved.exists():
        raise SourceNotFound(f"source {source!r}: no such file or directory")
    return resolved


def hub_files(repo_id: str, revision: str | None, subfolder: str | None, max_bytes: int) -> Path:
    """Downloads (or finds in the cache) a PEFT adapter's two files from the hub; the local folder holding them."""
    if not HUB_ID.match(repo_id):
        raise BadRequest(f"source: expected a hub repository id owner/name or an absolute path, got {repo_id!r}")
    if subfolder is not None and (".." in Path(subfolder).parts or subfolder.startswith("/")):
        raise BadRequest(f"subfolder: expected a relative folder inside the repository, got {subfolder!r}")
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        try:  # sizes first, so an oversized adapter is refused before it is downloaded
            info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
            sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
            too_big = [f for f in PEFT_FILES if sizes.get(prefix + f, 0) > max_bytes]
            if too_big:
                raise PayloadTooLarge(f"{repo_id}: {too_big[0]} is larger than the limit of {max_bytes} bytes")
        except (RepositoryNotFoundError, RevisionNotFoundError, PayloadTooLarge):
            raise
        except Exception:  # noqa: BLE001 - offline or unreachable: snapshot_download below answers from the cache
            pass
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=[prefix + f for f in PEFT_FILES])
    except RepositoryNotFoundError:
        raise SourceNotFound(f"hub repository {repo_id!r} not found (or private without a token)") from None
    except RevisionNotFoundError:
        raise SourceNotFound(f"hub repository {repo_id!r} has no revision {revision!r}") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError):  # LocalEntryNotFoundError is an EntryNotFoundError
        raise SourceUnavailable(
            f"hub repository {repo_id!r} is not in the local cache and the hub cannot be reached (offline mode or "
            "no network): download it where the hub is reachable, or name a local path"
        ) from None
    except EntryNotFoundError as e:
        raise SourceNotFound(f"hub repository {repo_id!r}: {e}") from None
    except OSError as e:
        raise SourceUnavailable(f"hub repository {repo_id!r} could not be fetched: {e}") from None
    return Path(folder) / prefix if prefix else Path(folder)


def read_adapter(
    path: Path, max_bytes: int, *, allowed: list[str] | None = None, budget_s: float = READ_BUDGET_S
) -> tuple[str, dict[str, bytes]]:
    """("peft", {config, weights}) for a PEFT directory, ("artifact", {artifact}) for an artifact file. With
    `allowed` (local sources), every file must lie inside those directories once its own links are resolved."""
    deadline = time.monotonic() + budget_s
    if path.is_dir():
        files = {name: path / name for name in PEFT_FILES}
        missing = [n for n, f in files.items() if not f.exists()]
        if missing:
            raise SourceNotFound(f"{path.name}: a PEFT adapter directory needs {', '.join(missing)}")
        return "peft", {n: _read(f, n, max_bytes, allowed, deadline) for n, f in files.items()}
    return "artifact", {"artifact": _read(path, path.name, max_bytes, allowed, deadline)}


def _read(path: Path, name: str, max_bytes: int, allowed: list[str] | None, deadline: float) -> bytes:
    """A regular file's bytes, within the size limit and the time left. Its links are resolved first and the target
    checked against `allowed`; it is then opened without following a link (O_NOFOLLOW) and without blocking
    (O_NONBLOCK: a FIFO or a device can neither hang the open nor be read), and must be a regular file. Messages
    name the file, never its bytes."""
    resolved = path.resolve()
    if allowed is not None and not inside(resolved, [Path(d).resolve() for d in allowed]):
        raise Forbidden(f"{name} links outside the directories this server allows")
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SourceNotFound(f"{name}: no such file") from None
    except OSError as e:
        raise Forbidden(f"{name} cannot be opened ({e.strerror})") from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadRequest(f"{name} is not a regular file")
        if st.st_size > max_bytes:
            raise PayloadTooLarge(f"{name} is larger than the limit of {max_bytes} bytes")
        chunks, total = [], 0
        while chunk := f.read(1024**2):
            total += len(chunk)
            if total > max_bytes:
                raise PayloadTooLarge(f"{name} is larger than the limit of {max_bytes} bytes")
            if time.monotonic() > deadline:
                raise SourceUnavailable(f"reading {name} took longer than {READ_BUDGET_S:g}s")
            chunks.append(chunk)
    return b"".join(chunks)
