"""The two ways the API tests reach an app.

`asgi_client`: the app in the test's own event loop through httpx's ASGI transport, no socket and no server thread,
its lifespan entered as a server enters it: for plain request/response checks (validation, admin routes, status
codes, metrics). `live_server`: a real uvicorn server in a thread, configured as `python -m service` runs it
(connection and header limits), for what needs real HTTP: body-size limits and stalled bodies, client disconnects,
streaming (SSE), timeouts, the openai client, CLI subprocesses and several replicas."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, contextmanager

import httpx
import uvicorn

from service.server import uvicorn_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app):
    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, app.state.settings, "127.0.0.1", port))
    app.state.stop_server = lambda: setattr(server, "should_exit", True)  # as service.server.run does
    thread = threading.Thread(target=server.run, daemon=True, name="live-server")
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@asynccontextmanager
async def asgi_client(app, **client_kw) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on `app` in this event loop, with no socket: the app's lifespan (store, backbone, scheduler)
    entered first and left after the client closes, as uvicorn does. ASGITransport runs no lifespan itself. Unhandled
    errors come back as the app's 500 responses (as from a server), not raised into the test."""
    client_kw.setdefault("timeout", 30)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://asgi", **client_kw) as client:
            yield client
