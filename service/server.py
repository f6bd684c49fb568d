"""Running the app under uvicorn with the limits uvicorn lacks or leaves open.

- Connections: at most `max_connections` open at once. One more is closed as soon as it is accepted, before it can
  hold a file descriptor for long; requests past the limit on open connections get uvicorn's 503.
- Request heads: the request line and headers must arrive within `header_timeout_s` of the connection opening (or
  of the first byte of the next request on a kept-alive connection); uvicorn has no such timeout, so a client
  trickling headers could hold a connection forever. Bodies are timed by `service.guard`.
- Keep-alive: idle connections close after `keep_alive_timeout_s` (above the idle timeouts of common proxies, so a
  pooled connection is closed by the proxy first and never raced).
- File descriptors: the soft limit is raised to the hard one, so the connection cap fits under it.
- Logs: a message repeated faster than `LogRateLimit` allows (an accept error under load repeats thousands of
  times a second) is suppressed, with a count of what was dropped.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .request_ids import JsonFormatter, RequestIdFilter
from .settings import ServiceSettings

log = logging.getLogger(__name__)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a deadline for each request head (see the module doc).
    Subclassed per server by `protocol_class`, which sets the two limits."""

    max_connections = 1024
    header_timeout_s = 15.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    # uvicorn's signature, with its ignore: asyncio types the transport as a BaseTransport, a stream's is a Transport
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            _limited.warning("connection limit %d reached: closing a new connection", self.max_connections)
            transport.abort()
            return
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self._arm_head_timer()  # the first byte of a (next) request: its head is now on the clock
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # h11 parsed a complete request head
            self._cancel_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:
            _limited.info("request head not received within %gs: closing the connection", self.header_timeout_s)
            self.transport.close()


def protocol_class(settings: ServiceSettings) -> type[GuardedH11Protocol]:
    return type(
        "ServiceH11Protocol",
        (GuardedH11Protocol,),
        {"max_connections": settings.max_connections, "header_timeout_s": settings.header_timeout_s},
    )


class LogRateLimit(logging.Filter):
    """Lets through at most `burst` records of one (logger, level, rendered message) per `window_s`; when a window
    with suppressed records ends, the next record of that kind says how many were dropped. Keyed by the rendered
    message, so only true repeats are limited, never a stream of distinct events."""

    def __init__(self, burst: int = 10, window_s: float = 60.0) -> None:
        super().__init__()
        self.burst, self.window_s = burst, window_s
        self._seen: dict[tuple[str, int, str], list[float | int]] = {}  # key -> [window start, count, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] >= self.window_s:
            dropped = int(entry[2]) if entry is not None else 0
            self._seen[key] = [now, 1, 0]
            if dropped:
                record.msg = f"{record.msg} [{dropped} similar messages suppressed in the last {self.window_s:g}s]"
            if len(self._seen) > 10_000:  # templates are few; this bounds the map whatever happens
                self._seen.clear()
            return True
        entry[1] += 1
        if entry[1] <= self.burst:
            return True
        entry[2] += 1
        return False


_limited = logging.getLogger("service.server.limits")


def configure_logging(level: str, fmt: str = "text") -> None:
    """Root logging with the request id (and the task version the request runs, `task@N`) and the rate limit on its
    handler; uvicorn's loggers propagate to it (log_config=None). fmt "json": one JSON object per line."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s [%(request_id)s %(served)s]: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
        handler.addFilter(LogRateLimit())
        if fmt == "json":
            handler.setFormatter(JsonFormatter())


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, e)


def uvicorn_config(app: Any, settings: ServiceSettings, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol_class(settings),
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=int(settings.keep_alive_timeout_s),
        log_config=None,
        log_level=settings.log_level,
    )


EXIT_ENGINE_FAILED = 3  # the process's exit status when the engine gave up (a device fault, failed steps)


def run(app: Any, settings: ServiceSettings, host: str, port: int) -> int:
    """Serves until stopped; returns the process's exit status (EXIT_ENGINE_FAILED when the engine gave up, so a
    supervisor that restarts on failure restarts it)."""
    raise_fd_limit()
    server = uvicorn.Server(uvicorn_config(app, settings, host, port))
    app.state.stop_server = lambda: setattr(server, "should_exit", True)
    server.run()
    return EXIT_ENGINE_FAILED if app.state.fatal else 0
