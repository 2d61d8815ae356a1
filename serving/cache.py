"""A thread-safe LRU cache bounded in bytes, with explicit get/put/evict/stats and a frequency-based
admission test (TinyLFU: Einziger, Friedman and Manes, 2017; the policy of Java's Caffeine).

Why admission: when the tasks in use outnumber what fits (1,000 tasks of 1.2 MB against 256 MiB),
admitting every miss evicts an entry per request for nothing: with uniform requests the hit rate is
capacity / tasks whatever is kept, and each admission costs a fresh allocation. A miss that is not
admitted can instead be computed into reusable buffers (serving.snapshot), so a stable cache makes
misses cheaper without changing the hit rate; a task used more often than the entries it would
displace still gets in at once.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    capacity_bytes: int
    rejections: int = 0  # misses whose value was not kept: no more frequent than what it would evict


class LRUCache:
    """Entries have a size in bytes; the least recently used are evicted to stay under capacity.

    An entry larger than the whole capacity is returned to its caller but not kept. `put` always
    stores; `get_or_create` stores only what `admits` lets in.
    """

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = self._hits = self._misses = self._evictions = self._rejections = 0
        self._frequency: dict[Hashable, int] = {}  # lookups per key, halved every `_window()` lookups
        self._lookups = 0
        self._closed: weakref.WeakSet = weakref.WeakSet()  # views whose puts are refused (CacheView.close)
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            self._count(key)
            if key not in self._entries:
                self._misses += 1
                return None
            self._hits += 1
            self._entries.move_to_end(key)
            return self._entries[key][0]

    def put(self, key: Hashable, value: Any, size: int, owner: "CacheView | None" = None) -> None:
        """Store `value` under `key` (replacing any), unless `owner` is closed."""
        with self._lock:
            if owner is not None and owner in self._closed:
                return
            if key in self._entries:
                self._bytes -= self._entries.pop(key)[1]
            if size > self.capacity_bytes:
                return
            self._entries[key] = (value, size)
            self._bytes += size
            while self._bytes > self.capacity_bytes:
                self._bytes -= self._entries.popitem(last=False)[1][1]
                self._evictions += 1

    def __contains__(self, key: Hashable) -> bool:
        """Whether `key` is stored; unlike `get`, not a lookup (no hit, miss or frequency counted)."""
        with self._lock:
            return key in self._entries

    def admits(self, key: Hashable, size: int, owner: "CacheView | None" = None) -> bool:
        """Whether a missed `key` of `size` bytes should be stored: yes while it fits without evicting;
        otherwise only if it was looked up more often (recently) than every entry it would evict.
        A refusal counts in `stats().rejections`; a closed `owner`'s is no policy's and is not counted."""
        with self._lock:
            if owner is not None and owner in self._closed:
                return False
            if size <= self.capacity_bytes - self._bytes:
                return True
            if size <= self.capacity_bytes:
                needed, freed, candidate = self._bytes + size - self.capacity_bytes, 0, self._frequency.get(key, 0)
                for victim, (_, victim_size) in self._entries.items():  # least recently used first
                    if self._frequency.get(victim, 0) >= candidate:
                        break
                    freed += victim_size
                    if freed >= needed:
                        return True
            self._rejections += 1
            return False

    def get_or_create(self, key: Hashable, create: Callable[[], tuple[Any, int]],
                      owner: "CacheView | None" = None) -> Any:
        """The cached value, or `create()`'s (value, size), stored if `admits` it, and returned."""
        value = self.get(key)
        if value is None:
            value, size = create()
            if self.admits(key, size, owner):
                self.put(key, value, size, owner)
        return value

    def view(self) -> "CacheView":
        """A view of this cache for one owner of entries (a snapshot), which can be closed."""
        return CacheView(self)

    def _close(self, view: "CacheView") -> None:
        with self._lock:  # under the lock: a put that checked before this has stored, one after is refused
            self._closed.add(view)

    def evict(self, key: Hashable) -> bool:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._bytes -= entry[1]
            return entry is not None

    def evict_where(self, predicate: Callable[[Hashable], bool]) -> tuple[int, int]:
        """Drop every entry whose key satisfies `predicate` (not counted as evictions: nothing pushed
        them out); return how many entries and bytes that freed."""
        with self._lock:
            doomed = [key for key in self._entries if predicate(key)]
            freed = sum(self._entries.pop(key)[1] for key in doomed)
            self._bytes -= freed
            return len(doomed), freed

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._evictions, len(self._entries), self._bytes,
                              self.capacity_bytes, self._rejections)

    def _count(self, key: Hashable) -> None:
        """One more lookup of `key`; every `_window()` lookups all counts halve (and zeros are
        dropped), so frequencies follow the recent workload and the table stays small."""
        self._frequency[key] = self._frequency.get(key, 0) + 1
        self._lookups += 1
        if self._lookups >= self._window():
            self._lookups = 0
            self._frequency = {k: n // 2 for k, n in self._frequency.items() if n > 1}

    def _window(self) -> int:
        return 8 * len(self._entries) + 64


class CacheView:
    """The cache as one owner of entries uses it (a snapshot, its mask stack, the ONNX sessions built
    for it): the same entries, and its puts go to the cache until `close()`, after which they are
    refused. Why: a snapshot that is unloaded has its entries evicted, and requests still running on
    it would otherwise build and put them back, where nothing evicts them again."""

    def __init__(self, cache: LRUCache):
        self.cache = cache

    @property
    def capacity_bytes(self) -> int:
        return self.cache.capacity_bytes

    def get(self, key: Hashable) -> Any | None:
        return self.cache.get(key)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.cache

    def put(self, key: Hashable, value: Any, size: int) -> None:
        self.cache.put(key, value, size, self)

    def admits(self, key: Hashable, size: int) -> bool:
        return self.cache.admits(key, size, self)

    def get_or_create(self, key: Hashable, create: Callable[[], tuple[Any, int]]) -> Any:
        return self.cache.get_or_create(key, create, self)

    def evict(self, key: Hashable) -> bool:
        return self.cache.evict(key)

    def stats(self) -> CacheStats:
        return self.cache.stats()

    def view(self) -> "CacheView":
        """Another view of the same cache (a view passed where a cache is taken)."""
        return self.cache.view()

    def close(self) -> None:
        """Refuse this view's puts from now on (reads go on): what still runs on its owner builds
        what it misses without keeping it."""
        self.cache._close(self)
