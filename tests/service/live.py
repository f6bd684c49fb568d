"""A real uvicorn server in a thread, configured as `python -m service` runs it (connection and header limits), for
tests that need real HTTP (disconnects, the openai client, abuse)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

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
