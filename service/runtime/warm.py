"""Tasks kept warm in this replica's device tier: preloaded at start (the service's PREFIXSERVE_PRELOAD_TASKS globs),
and pinned. A pin is stored with the task in Redis (`PrefixStore.pin`) and applied by every replica when it hears the
event: the task's current version is loaded and pinned resident (`DeviceCache.pin`), and the pin follows the current
version when a publish or a rollback moves it. A (re)subscription reads every pin again, since pub/sub does not
replay what was missed.

The warm-up at start reads the pins, pins those tasks, then loads the preload globs' other tasks (current versions)
into room nothing else uses, stopping at the first that does not fit. `progress` says how far it got, for /ready.
A task that fails to load is logged and skipped. A pin that fails for now on this replica (running rows hold the room
it needs, or Redis is away) is retried in the background, backing off, until it is applied, the next event of the
task supersedes it, or `retry_attempts` are spent; meanwhile the task's previous version, if it was pinned here,
stays pinned. A pin refused for good here (past this replica's pin budget, refused by the backbone) is logged and
the task served unpinned. Engine state changes only on the engine's thread (Scheduler.on_engine), between steps;
this set's own operations run one at a time, in the order their events arrived.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from prefix_store import PrefixStore, StoreEvent, StoreUnavailable

from .engine import DeviceFull, Engine
from .errors import Overloaded
from .scheduler import Scheduler

log = logging.getLogger(__name__)
T = TypeVar("T")


class WarmSet:
    """Args:
    scheduler: its engine holds the device tier; its host cache resolves current versions and tells this set every
        store event and (re)subscription (the hooks are installed here: build this before starting the host cache).
    store: where pins are stored.
    preload: task-name globs (fnmatch) whose current versions the warm-up loads after the pinned tasks.
    retry_s: (first, longest) wait between two tries of a pin that failed for now, doubling from the first.
    retry_attempts: the tries after the first before a pin is given up on this replica. The defaults span about six
        minutes, past the default request deadline (300 s), so rows holding the room have finished by then.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        store: PrefixStore,
        preload: Sequence[str] = (),
        *,
        retry_s: tuple[float, float] = (0.5, 10.0),
        retry_attempts: int = 40,
    ) -> None:
        self.scheduler = scheduler
        self.host_cache = scheduler.host_cache
        self.store = store
        self.preload = list(preload)
        self.pinned: set[str] = set()  # the tasks pinned in the store, as this replica last heard
        self.total = 0  # tasks the warm-up loads: the pinned ones, then the preload globs' others
        self.loaded = 0  # of those, loaded or skipped so far
        self.done = False  # the warm-up at start has finished
        self.pins_read = asyncio.Event()  # the pins were read from the store, and those tasks pinned, once
        self._lock = asyncio.Lock()
        self._sync: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.retry_s = retry_s
        self.retry_attempts = retry_attempts
        self._retries: dict[str, asyncio.Task[None]] = {}  # task -> its pin being retried here
        self.host_cache.on_event = self._on_event
        self.host_cache.on_subscribed = self._on_subscribed

    def start(self) -> None:
        """Starts the warm-up: the pins, read at the first subscription, then the tasks matching `preload`."""
        self._spawn(self._warm_up())

    async def stop(self) -> None:
        tasks = [*self._tasks, *([self._sync] if self._sync is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def progress(self) -> bool | str:
        """True once the warm-up has finished, else what it is doing (for /ready)."""
        if self.done:
            return True
        if not self.pins_read.is_set() and not self.total:
            return "reading pinned tasks"
        return f"loading {self.loaded}/{self.total} tasks"

    # -- the admin routes' calls ----------------------------------------------------------------------------------
    async def pin(self, task: str) -> tuple[int, int]:
        """Pins the task's current version here first, so that a refusal (PinRefused: beyond the pins' share;
        Overloaded: running rows hold the room now) reaches the caller before anything is stored, then in the store,
        which every replica hears. Returns (version, device bytes it holds). Raises TaskNotFound."""
        self._supersede(task)
        async with self._lock:
            artifact = await self.host_cache.get(task)
            try:
                nbytes = await self.scheduler.on_engine(lambda e: e.pin(artifact))
            except DeviceFull as e:
                raise Overloaded(f"{e}: running requests hold the device prefix cache; retry") from None
            try:
                await self.store.pin(task)
            except BaseException:
                if task not in self.pinned:  # not stored: not pinned here either
                    await self.scheduler.on_engine(lambda e: e.unpin(task))
                raise
            self.pinned.add(task)
            assert artifact.version is not None, "stored versions are numbered"
            return artifact.version, nbytes

    async def unpin(self, task: str) -> None:
        """Unpins the task in the store (every replica hears it) and here. Raises TaskNotFound."""
        self._supersede(task)
        async with self._lock:
            await self.store.pin(task, False)
            self.pinned.discard(task)
            await self.scheduler.on_engine(lambda e: e.unpin(task))

    # -- events ---------------------------------------------------------------------------------------------------
    def _on_event(self, ev: StoreEvent) -> None:
        if ev.type in ("pin", "unpin", "delete") or (ev.type in ("publish", "rollback") and ev.task in self.pinned):
            self._supersede(ev.task)  # what the event queues decides the task's pin here now
        if ev.type == "pin":
            self.pinned.add(ev.task)
            self._spawn(self._locked(self._pin_current, ev.task))
        elif ev.type == "unpin":
            self.pinned.discard(ev.task)
            self._spawn(self._locked(self._unpin_here, ev.task))
        elif ev.type in ("publish", "rollback") and ev.task in self.pinned:
            self._spawn(self._locked(self._pin_current, ev.task))  # the pin follows the current version
        elif ev.type == "delete":
            # Engine.invalidate drops its versions, pin included, at the engine's next call: make it now.
            self.pinned.discard(ev.task)
            self._spawn(self._locked(self._unpin_here, ev.task))

    def _on_subscribed(self) -> None:
        if self._sync is not None:
            self._sync.cancel()  # a newer subscription reads the pins again
        for task in list(self._retries):  # ... and pins each again, retrying afresh what fails for now
            self._supersede(task)
        self._sync = asyncio.create_task(self._read_pins(), name="warm-set-pins")

    async def _read_pins(self) -> None:
        """Reads every pin (retrying while Redis is away) and makes this replica's pins match."""
        names = await _retrying("reading pinned tasks", self.store.pinned_tasks)
        async with self._lock:
            first = not self.pins_read.is_set()
            here = set(self.scheduler.engine.pins)
            self.pinned = set(names)
            for task in sorted(here - self.pinned):
                await self._unpin_here(task)
            if first:
                self.total += len(names)
            for task in names:
                await self._pin_current(task)
                if first:
                    self.loaded += 1
            if first and not self.preload:
                self.done = True  # nothing else to load: ready as soon as the pins are
            self.pins_read.set()

    async def _pin_current(self, task: str) -> None:
        """Pins the task's current version here (its previous version, if pinned, goes back to the cache); a task
        gone or unpinned meanwhile is left alone, a refusal logged, a failure for now retried in the background."""
        error = await self._try_pin(task)
        if error is not None:
            log.warning(
                "pinning task %r on this replica failed for now: %s; %s; retrying", task, error, self._pinned_here(task)
            )
            self._supersede(task)
            self._retries[task] = self._spawn(self._retry(task), f"warm-set-retry-{task}")

    async def _try_pin(self, task: str) -> Exception | None:
        """One try at pinning the task's current version here. Returns the failure worth trying again (DeviceFull:
        running rows hold the room; StoreUnavailable: Redis away); None once pinned, when the task is not pinned in
        the store any more, or when the pin is refused for good here, which is logged."""
        if task not in self.pinned:
            return None
        try:
            artifact = await self.host_cache.get(task)
            await self.scheduler.on_engine(lambda e: e.pin(artifact))
        except asyncio.CancelledError:
            raise
        except (DeviceFull, StoreUnavailable) as e:
            return e
        except Exception as e:  # TaskNotFound (deleted meanwhile), PinRefused (past this replica's budget), ...
            log.warning("pinning task %r on this replica was refused: %s; %s", task, e, self._pinned_here(task))
        return None

    async def _retry(self, task: str) -> None:
        """Tries the task's pin again, backing off, until it is applied or refused for good, or the tries are spent;
        cancelled when an event of the task (or a resubscription) supersedes it, or when the set stops."""
        delay, longest = self.retry_s
        error: Exception | None = None
        try:
            for attempt in range(1, self.retry_attempts + 1):
                await asyncio.sleep(delay)
                async with self._lock:
                    error = await self._try_pin(task)
                if error is None:
                    log.info("task %r, its pin retried %d times: %s", task, attempt, self._pinned_here(task))
                    return
                delay = min(2 * delay, longest)
            log.error(
                "gave up pinning task %r on this replica after %d retries: %s; %s",
                task,
                self.retry_attempts,
                error,
                self._pinned_here(task),
            )
        finally:
            if self._retries.get(task) is asyncio.current_task():
                del self._retries[task]

    def _supersede(self, task: str) -> None:
        retry = self._retries.pop(task, None)
        if retry is not None:
            retry.cancel()

    def _pinned_here(self, task: str) -> str:
        """What this replica holds pinned for the task now, for the log (its previous version stays pinned when the
        current one could not take its place)."""
        version = self.scheduler.engine.pins.get(task)
        return "not pinned here" if version is None else f"v{version} pinned here"

    async def _unpin_here(self, task: str) -> None:
        await self.scheduler.on_engine(lambda e: e.unpin(task))

    async def _warm_up(self) -> None:
        await self.pins_read.wait()  # pins come first in the budget
        globs = self.preload
        if globs:
            tasks = await _retrying("listing tasks to preload", self.store.list_tasks)
            names = [t.name for t in tasks if t.name not in self.pinned and _matches(t.name, globs)]
            self.total += len(names)
            for i, name in enumerate(names):
                try:
                    artifact = await self.host_cache.get(name)
                    fits = await self.scheduler.on_engine(functools.partial(Engine.warm, artifact=artifact))
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # deleted meanwhile, refused by the backbone, store away: skipped
                    log.warning("preloading task %r failed, skipped: %s", name, e)
                    self.loaded += 1
                    continue
                if not fits:
                    log.warning(
                        "the device prefix cache is full: preloaded %d of %d tasks; %s stay cold",
                        i,
                        len(names),
                        ", ".join(repr(n) for n in names[i:]),
                    )
                    self.loaded += len(names) - i
                    break
                self.loaded += 1
            log.info("warm-up done: %d tasks, pinned ones first, then those matching %s", self.total, ",".join(globs))
        self.done = True

    # -- plumbing -------------------------------------------------------------------------------------------------
    async def _locked(self, fn: Callable[[str], Awaitable[None]], task: str) -> None:
        async with self._lock:
            await fn(task)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str | None = None) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("keeping tasks warm failed: %s", task.exception())


def _matches(name: str, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


async def _retrying(what: str, call: Callable[[], Awaitable[T]]) -> T:
    """call() until Redis answers (a warm-up must not give up on a store that is briefly away), backing off to 5 s."""
    delay = 0.1
    while True:
        try:
            return await call()
        except StoreUnavailable as e:
            log.warning("%s failed (%s); retrying in %.1fs", what, e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
