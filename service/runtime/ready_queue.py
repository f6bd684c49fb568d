"""The requests ready for admission: by priority class first (every ready "high" request before any "normal" one,
every "normal" before any "low"), then, within a class, fair at two levels: round-robin over tasks (a hot task cannot
starve the others) and, within a task, round-robin over its clients (one client's 512-row completion cannot hold
another client of the same task back until it is done); each client's requests in arrival order.

A client is whatever the service names it (service.auth.client_id: the API key's digest, or on a server without
keys the request's `user` field); "" when nothing names it. A request's priority is its key's (service.auth); the
classes are strict, so a lower class can wait for as long as a higher one keeps the server busy: that is the
contract (a batch tenant at "low" yields to interactive ones), not a fault.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

PRIORITIES = ("high", "normal", "low")  # the admission classes, the first admitted first


class Queued(Protocol):
    task: str | None
    client: str
    priority: str  # one of PRIORITIES


T = TypeVar("T", bound=Queued)


class ReadyQueue(Generic[T]):
    """One fair queue (_FairQueue) per priority class, each request in its own class's. The admission loop takes the
    classes in turn (`priorities`, then `heads` of each): a class gets what rows and key/value budget the classes
    above it could not use this step, and nothing while one of them has a ready request waiting for room."""

    def __init__(self) -> None:
        self._classes: dict[str, _FairQueue[T]] = {p: _FairQueue() for p in PRIORITIES}

    def __len__(self) -> int:
        return sum(len(q) for q in self._classes.values())

    def __bool__(self) -> bool:
        return any(self._classes.values())

    def __iter__(self) -> Iterator[T]:
        for queue in self._classes.values():
            yield from queue

    def push(self, item: T) -> None:
        self._classes[item.priority].push(item)

    def remove(self, item: T) -> bool:
        return self._classes[item.priority].remove(item)

    def priorities(self) -> list[str]:
        """The classes with ready requests, highest first."""
        return [p for p, queue in self._classes.items() if queue]

    def has(self, priority: str) -> bool:
        return bool(self._classes[priority])

    def heads(self, priority: str | None = None) -> list[T]:
        """This turn's candidates of one class (by default the highest with requests): one per task, its next
        client's oldest request, tasks in turn order."""
        if priority is None:
            ready = self.priorities()
            if not ready:
                return []
            priority = ready[0]
        return self._classes[priority].heads()

    def pop(self, item: T, *, served: bool) -> None:
        """Takes `item` (a head of its class) out; `served`: it was admitted, so its client and its task go to the
        back of its class's turns."""
        self._classes[item.priority].pop(item, served=served)

    def admission_order(self, priority: str | None = None) -> Iterator[T]:
        """Every queued request (of one class, given `priority`) in the order admission takes them when nothing
        holds one back: class by class, and within a class one per task per turn, each task's clients in turn."""
        for p, queue in self._classes.items():
            if priority is None or p == priority:
                yield from queue.admission_order()

    def of(self, priority: str) -> Iterator[T]:
        """The queued requests of one class, in no particular order."""
        return iter(self._classes[priority])


class _FairQueue(Generic[T]):
    """One priority class: round-robin over tasks, within a task over its clients, each client's requests FIFO."""

    def __init__(self) -> None:
        # task ("" = bare) -> client -> FIFO; the first task and, in each task, the first client are next
        self._tasks: OrderedDict[str, OrderedDict[str, deque[T]]] = OrderedDict()
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    def __iter__(self) -> Iterator[T]:
        for clients in self._tasks.values():
            for queue in clients.values():
                yield from queue

    def push(self, item: T) -> None:
        self._tasks.setdefault(item.task or "", OrderedDict()).setdefault(item.client, deque()).append(item)
        self._n += 1

    def remove(self, item: T) -> bool:
        clients = self._tasks.get(item.task or "")
        queue = None if clients is None else clients.get(item.client)
        if queue is None or item not in queue:
            return False
        queue.remove(item)
        self._n -= 1
        self._prune(item.task or "", item.client)
        return True

    def heads(self) -> list[T]:
        """This turn's candidates, one per task (its next client's oldest request), tasks in turn order."""
        return [next(iter(clients.values()))[0] for clients in self._tasks.values()]

    def pop(self, item: T, *, served: bool) -> None:
        """Takes `item` (a head) out; `served`: it was admitted, so its client and its task go to the back."""
        key = item.task or ""
        clients = self._tasks[key]
        queue = clients[item.client]
        assert queue[0] is item, "only a head is popped"
        queue.popleft()
        self._n -= 1
        if served:
            clients.move_to_end(item.client)
            self._tasks.move_to_end(key)
        self._prune(key, item.client)

    def admission_order(self) -> Iterator[T]:
        """Every queued request in the order admission takes them when nothing holds one back: one per task per
        turn, each task's clients in turn."""
        per_task = [_interleaved(clients) for clients in self._tasks.values()]
        while per_task:
            still = []
            for it in per_task:
                item = next(it, None)
                if item is not None:
                    yield item
                    still.append(it)
            per_task = still

    def _prune(self, task: str, client: str) -> None:
        clients = self._tasks[task]
        if not clients[client]:
            del clients[client]
        if not clients:
            del self._tasks[task]


def _interleaved(clients: OrderedDict[str, deque[T]]) -> Iterator[T]:
    """A task's requests, its clients in turn."""
    iters = [iter(list(q)) for q in clients.values()]
    while iters:
        still = []
        for it in iters:
            item = next(it, None)
            if item is not None:
                yield item
                still.append(it)
        iters = still
