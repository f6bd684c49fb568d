"""Shared fixtures: one real embedded Redis server per test session, a fresh key namespace per test."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from prefix_store import EmbeddedRedis, PrefixStore, connect


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
