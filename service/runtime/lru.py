"""A least-recently-used map bounded by the bytes of its values, with hit/miss/eviction counters."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """Args:
    capacity_bytes: evict least recently used entries past this total; the newest entry always stays.
    size: the bytes one value holds.
    """

    def __init__(self, capacity_bytes: int, size: Callable[[V], int]) -> None:
        self.capacity = capacity_bytes
        self.size = size
        self.entries: OrderedDict[K, V] = OrderedDict()
        self.resident_bytes = 0
        self.stats = {"hits": 0, "misses": 0, "evictions": 0}

    def __contains__(self, key: K) -> bool:
        return key in self.entries

    def get(self, key: K) -> V | None:
        value = self.entries.get(key)
        if value is None:
            self.stats["misses"] += 1
            return None
        self.stats["hits"] += 1
        self.entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self.drop(lambda k: k == key)
        self.entries[key] = value
        self.resident_bytes += self.size(value)
        while self.resident_bytes > self.capacity and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.resident_bytes -= self.size(old)
            self.stats["evictions"] += 1

    def drop(self, match: Callable[[K], bool]) -> None:
        for key in [k for k in self.entries if match(k)]:
            self.resident_bytes -= self.size(self.entries.pop(key))
