"""Shared fixtures: one real embedded Redis server per test session, a fresh key namespace per test. Also: the
versions the suite runs on (in its header), the tiers (markers, see pyproject.toml: a test that uses the Redis server
is marked `redis` whatever its module says; a `gpu` test is skipped where torch sees no CUDA device; `make test-fast`
runs what is neither `redis`, `slow` nor `gpu`), and the PEFT reference gate of `make test-latest`."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import torch

from prefix_store import EmbeddedRedis, PrefixStore, connect

# Set by `make test-latest`: the newest releases, where PEFT itself may be broken.
LATEST = bool(os.environ.get("PREFIXSERVE_TEST_LATEST"))


def pytest_report_header(config) -> str:
    names = ("torch", "transformers", "peft", "redis", "fastapi", "tokenizers")
    versions = ", ".join(f"{n} {importlib.metadata.version(n)}" for n in names)
    return f"prefix-serve suite on {'the newest releases' if LATEST else 'the lock'}: {versions}"


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by markers
def pytest_collection_modifyitems(config, items) -> None:
    mark_tiers(items)
    gate_peft_references(items)


def mark_tiers(items) -> None:
    """A test that uses the Redis server (directly or through a fixture) is `redis`, so the fast tier never starts
    one; a `gpu` test is skipped, saying why, where torch sees no CUDA device."""
    cuda = torch.cuda.is_available()
    for item in items:
        if "redis_server" in getattr(item, "fixturenames", ()) and item.get_closest_marker("redis") is None:
            item.add_marker(pytest.mark.redis)
        if item.get_closest_marker("gpu") is not None and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False"))


def gate_peft_references(items) -> None:
    """Under `make test-latest`, a test marked peft_reference(capability) is an expected failure when the probe
    finds that capability of PEFT broken on the installed transformers. Under the lock nothing is excused: PEFT must
    work there (test_peft_probe checks it)."""
    marked = [(item, item.get_closest_marker("peft_reference")) for item in items]
    marked = [(item, m) for item, m in marked if m is not None]
    if not LATEST or not marked:
        return
    from tests import peft_probe

    broken = peft_probe.broken()
    for item, marker in marked:
        problems = [broken[c] for c in marker.args if c in broken]
        if problems:
            item.add_marker(pytest.mark.xfail(reason="; ".join(problems), strict=False))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    # A short path: the server's unix socket lives in it and sun_path is limited to ~100 characters.
    data_dir = tempfile.mkdtemp(prefix="ps-redis-")
    server = EmbeddedRedis(data_dir)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[PrefixStore]:
    s = PrefixStore(connect(redis_url), namespace=f"test-{uuid.uuid4().hex[:12]}")
    yield s
    await s.aclose()
