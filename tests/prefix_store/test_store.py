import asyncio
import shutil
import tempfile

import pytest
import torch

from prefix_store import (
    ArtifactError,
    ArtifactFormatError,
    ArtifactShapeError,
    ArtifactTooLarge,
    ChecksumMismatch,
    EmbeddedRedis,
    InvalidTaskName,
    NonFiniteTensorError,
    PrefixStore,
    StoreUnavailable,
    TaskNotFound,
    VersionConflict,
    VersionNotFound,
    connect,
    encode,
)
from tests.factories import make_artifact, rewrite_blob

pytestmark = pytest.mark.redis


@pytest.mark.parametrize("method", ["prefix_tuning", "p_tuning_v2", "prompt_tuning", "p_tuning"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
async def test_put_get_round_trip(store, method, dtype):
    art = make_artifact("rt", method, dtype=dtype, labels=["neg", "pos"])
    stored = await store.put(art)
    assert stored.version == 1 and stored.created_at
    got = await store.get("rt")
    assert got.version == 1 and got.method == method and got.dtype == dtype
    assert torch.equal(got.prefix_tensor, art.prefix_tensor)
    assert torch.equal(got.head.weight, art.head.weight) and got.head.labels == ["neg", "pos"]


async def test_versions_list_delete_rollback(store):
    for fill in (1.0, 2.0, 3.0):
        await store.put(make_artifact("t", fill=fill))
    await store.put(make_artifact("other", method="prompt_tuning"))
    assert (await store.get("t")).version == 3
    assert float((await store.get("t", 1)).kv[0, 0, 0, 0, 0]) == 1.0
    assert [s["version"] for s in await store.versions("t")] == [1, 2, 3]

    tasks = {t.name: t for t in await store.list_tasks()}
    assert set(tasks) == {"t", "other"}
    assert tasks["t"].current == 3 and tasks["t"].versions == [1, 2, 3]
    assert tasks["t"].summary["method"] == "prefix_tuning" and tasks["t"].summary["encoded_bytes"] > 0

    await store.rollback("t", 1)
    assert (await store.get("t")).version == 1 and await store.current_version("t") == 1
    await store.put(make_artifact("t", fill=4.0))  # a publish after a rollback gets a fresh number and is current
    assert (await store.get("t")).version == 4

    with pytest.raises(VersionConflict, match="version 4 is the current version"):
        await store.delete("t", 4)
    await store.delete("t", 2)
    assert [s["version"] for s in await store.versions("t")] == [1, 3, 4]
    with pytest.raises(VersionNotFound, match="has no version 2"):
        await store.get("t", 2)
    with pytest.raises(VersionNotFound):
        await store.rollback("t", 2)

    await store.delete("t")
    with pytest.raises(TaskNotFound):
        await store.get("t")
    with pytest.raises(TaskNotFound):
        await store.delete("t")
    assert [t.name for t in await store.list_tasks()] == ["other"]
    # Numbers are never reused, even after deleting the task, so (task, version) cache keys stay unique.
    assert (await store.put(make_artifact("t"))).version == 5


async def test_missing_things(store):
    with pytest.raises(TaskNotFound, match="'nope' not found"):
        await store.get("nope")
    with pytest.raises(TaskNotFound):
        await store.versions("nope")
    with pytest.raises(TaskNotFound):
        await store.rollback("nope", 1)
    with pytest.raises(InvalidTaskName):
        await store.get("Bad Name")


async def test_events_announce_every_change(store):
    received = []

    async def listen():
        async for ev in store.events():
            received.append(ev)
            if len(received) == 5:
                return

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0.2)  # let the subscription settle: pub/sub does not replay
    await store.put(make_artifact("ev"))
    await store.put(make_artifact("ev"))
    await store.rollback("ev", 1)
    await store.delete("ev", 2)
    await store.delete("ev")
    await asyncio.wait_for(listener, 5)
    assert [(e.type, e.task, e.version, e.current) for e in received] == [
        ("publish", "ev", 1, 1),
        ("publish", "ev", 2, 2),
        ("rollback", "ev", 1, 1),
        ("delete_version", "ev", 2, 1),
        ("delete", "ev", None, None),
    ]


async def test_fifty_concurrent_writers_get_fifty_consecutive_versions(redis_url, store):
    # Separate connections, so the writes really interleave on the server.
    stores = [PrefixStore(connect(redis_url), namespace=store.ns) for _ in range(50)]
    try:
        results = await asyncio.gather(*(s.put(make_artifact("hot", fill=float(i))) for i, s in enumerate(stores)))
    finally:
        await asyncio.gather(*(s.aclose() for s in stores))
    assert sorted(r.version for r in results) == list(range(1, 51))
    assert await store.current_version("hot") == 50
    # Each stored version holds exactly the tensor its writer sent.
    by_version = {r.version: float(r.kv[0, 0, 0, 0, 0]) for r in results}
    for v in (1, 17, 50):
        assert float((await store.get("hot", v)).kv[0, 0, 0, 0, 0]) == by_version[v]


async def test_readers_never_see_a_torn_or_mismatched_version(redis_url, store):
    # Writer i stores a tensor filled with i and records which version it got; a reader checks that whatever it
    # reads is a whole record whose version and contents belong together.
    fills: dict[int, float] = {}
    await store.put(make_artifact("race", fill=-1.0))
    fills[1] = -1.0
    stop = asyncio.Event()
    turn = asyncio.Lock()
    seen = []

    async def writer(i):
        s = PrefixStore(connect(redis_url), namespace=store.ns)
        try:
            for k in range(3):
                fill = float(i * 10 + k)
                # Writers take turns (concurrent writers are the fifty-writers test's subject); the readers race
                # each write, and the next waits until a reader has read this one, however loaded the machine is.
                async with turn:
                    art = await s.put(make_artifact("race", P=8, fill=fill))
                    fills[art.version] = fill
                    while not seen or max(v for v, _ in seen) < art.version:
                        await asyncio.sleep(0.001)
        finally:
            await s.aclose()

    async def reader():
        s = PrefixStore(connect(redis_url), namespace=store.ns)
        try:
            while not stop.is_set() or len(seen) < 40:  # a count, not a time: the machine may be loaded
                art = await s.get("race")
                values = art.kv.unique()
                assert values.numel() == 1, "torn record"
                seen.append((art.version, float(values[0])))
                await asyncio.sleep(0)
        finally:
            await s.aclose()

    readers = [asyncio.create_task(reader()) for _ in range(4)]
    await asyncio.gather(*(writer(i) for i in range(10)))
    stop.set()
    await asyncio.gather(*readers)
    assert len(seen) > 30 and len({v for v, _ in seen}) > 5
    for version, value in seen:
        if version in fills:  # every version is recorded once its writer returns
            assert fills[version] == value


def _widen(tensors):
    tensors["kv"] = torch.randn(3, 2, 4, 5, 8)  # H_kv = 4 where the fingerprint says 2


def _poison(tensors):
    tensors["kv"][0, 0, 0, 0, 0] = float("inf")


@pytest.mark.parametrize(
    "corrupt, error",
    [
        (lambda b: b[:-7], ArtifactFormatError),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), ChecksumMismatch),
        (lambda b: b"\x80\x04garbage", ArtifactFormatError),
        (lambda b: b + b"\0" * 6000, ArtifactTooLarge),
        (lambda b: rewrite_blob(b, tensor_edit=_widen, fix_checksum=True), ArtifactShapeError),
        (lambda b: rewrite_blob(b, tensor_edit=_poison, fix_checksum=True), NonFiniteTensorError),
        (lambda b: rewrite_blob(b, meta_edit=lambda m: m.update(task="Bad Name")), InvalidTaskName),
    ],
)
async def test_bad_bytes_leave_the_store_unchanged(store, corrupt, error):
    await store.put(make_artifact("keep", fill=7.0))
    before = await store.versions("keep")
    blob = encode(make_artifact("keep", fill=8.0))
    store.max_artifact_bytes = len(blob) + 4000
    with pytest.raises(error):
        await store.put_bytes(corrupt(blob))
    assert await store.versions("keep") == before
    assert float((await store.get("keep")).kv.unique()) == 7.0


async def test_invalid_artifacts_never_reach_the_store(store):
    await store.put(make_artifact("keep"))
    before = await store.list_tasks()
    with pytest.raises(InvalidTaskName):
        await store.put_bytes(encode(make_artifact("keep")), task="Not Valid")
    with pytest.raises(NonFiniteTensorError):
        await store.put(make_artifact("keep", fill=float("nan")))
    small = PrefixStore(store.client, namespace=store.ns, max_artifact_bytes=100)
    with pytest.raises(ArtifactTooLarge, match="the limit is 100"):
        await small.put(make_artifact("keep"))
    assert await store.list_tasks() == before
    assert issubclass(ArtifactTooLarge, ArtifactError)


async def test_put_bytes_renames(store):
    art = await store.put_bytes(encode(make_artifact("orig")), task="renamed")
    assert art.task == "renamed" and (await store.get("renamed")).version == 1


async def test_unreachable_redis_is_one_error_type():
    s = PrefixStore(connect("redis://127.0.0.1:1", socket_timeout=0.5), read_retries=2, retry_backoff_s=0.01)
    with pytest.raises(StoreUnavailable, match="after 3 attempts"):
        await s.get("t")
    with pytest.raises(StoreUnavailable, match="not acknowledged"):
        await s.put(make_artifact("t"))
    with pytest.raises(StoreUnavailable):
        await s.list_tasks()
    await s.aclose()


async def test_reads_retry_through_a_restart():
    data_dir = tempfile.mkdtemp(prefix="ps-retry-")
    server = EmbeddedRedis(data_dir)
    url = server.start()
    s = PrefixStore(connect(url), read_retries=8, retry_backoff_s=0.05)
    try:
        await s.put(make_artifact("r"))
        server.stop()
        restart = asyncio.get_running_loop().run_in_executor(None, server.start)
        art = await s.get("r")  # fails while the server is down, then succeeds after backoff
        await restart
        assert art.version == 1
    finally:
        await s.aclose()
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_embedded_redis_persists_across_restart():
    data_dir = tempfile.mkdtemp(prefix="ps-aof-")
    try:
        with EmbeddedRedis(data_dir) as server:
            s = PrefixStore(connect(server.url))
            await s.put(make_artifact("durable", fill=3.0))
            await s.put(make_artifact("durable", fill=4.0))
            await s.rollback("durable", 1)
            await s.aclose()
        with EmbeddedRedis(data_dir) as server:
            s = PrefixStore(connect(server.url))
            art = await s.get("durable")
            assert art.version == 1 and float(art.kv.unique()) == 3.0
            assert [v["version"] for v in await s.versions("durable")] == [1, 2]
            await s.aclose()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_min_replicas_refuses_what_no_replica_confirmed(store, redis_url):
    """The embedded server has no replica: with min_replicas=1 nothing may be acknowledged (WAIT runs on the
    connection that wrote; on another one it would return at once and acknowledge)."""
    strict = PrefixStore(connect(redis_url), namespace=store.ns, min_replicas=1, replica_wait_s=0.1)
    with pytest.raises(StoreUnavailable, match="0 of 1 replicas confirmed"):
        await strict.put(make_artifact("t"))
    await store.put(make_artifact("t"))
    with pytest.raises(StoreUnavailable, match="0 of 1 replicas confirmed"):
        await strict.rollback("t", 1)
    await strict.aclose()
