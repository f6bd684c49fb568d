"""Giving freed memory back to the operating system.

A large request (a 200,000-character prompt, a 1 MiB JSON body) frees everything it allocated once answered, but
glibc keeps the freed pages in its heap, so without a trim the process's RSS ratchets up with every burst of large
requests (measured: +146 MB after 60 prompts of 200,000 characters, back to baseline after `malloc_trim`).
"""

from __future__ import annotations

import logging
import threading
import time

from .runtime.memory import libc_malloc_trim

log = logging.getLogger(__name__)


class Trimmer:
    """Calls malloc_trim(0) (glibc only; elsewhere a no-op) at most once per `min_interval_s`, off the caller's
    thread, when asked after a large request."""

    def __init__(self, min_interval_s: float = 1.0) -> None:
        self._trim = libc_malloc_trim()
        self._interval = min_interval_s
        self._last = 0.0
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return self._trim is not None

    def request(self) -> None:
        if self._trim is None:
            return
        now = time.monotonic()
        with self._lock:
            if now - self._last < self._interval:
                return
            self._last = now
        threading.Thread(target=self._trim, args=(0,), name="malloc-trim", daemon=True).start()
