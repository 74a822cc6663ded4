"""Per-language merged Zipper adapters, materialised on demand on the engine's device and kept in
an LRU bounded in bytes. Pinned languages are never evicted; preloaded ones are merged at start.

Eviction only drops the cache's reference: a batch that already holds a MergedAdapter keeps its
tensors alive until it finishes, so eviction never breaks an in-flight batch.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from adapters.export import SHARED_ADAPTER
from adapters.zipper import MergedAdapter
from server.metrics import Metrics

SHARED_KEY = SHARED_ADAPTER  # the shared subspace alone: unknown languages, and every language of a shared LoRA


class AdapterCache:
    def __init__(self, merge: Callable[[str], MergedAdapter], capacity_bytes: int, metrics: Metrics,
                 pinned: list[str] | None = None) -> None:
        self._merge = merge
        self.capacity_bytes = capacity_bytes
        self.metrics = metrics
        self.pinned = set(pinned or [])
        self._entries: OrderedDict[str, MergedAdapter] = OrderedDict()
        self._lock = threading.Lock()  # the engine thread and the HTTP thread (GET /v1/languages) both read

    def get(self, key: str) -> MergedAdapter:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.metrics.cache_hits.inc()
                return self._entries[key]
        start = time.perf_counter()
        adapter = self._merge(key)
        self.metrics.merge_seconds.observe(time.perf_counter() - start)
        self.metrics.cache_misses.inc()
        with self._lock:
            self._entries[key] = adapter
            self._evict()
            self._publish()
        return adapter

    def preload(self, keys: list[str]) -> None:
        for key in keys:
            self.get(key)

    def cached(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    @property
    def bytes_used(self) -> int:
        return sum(a.nbytes for a in self._entries.values())

    def _evict(self) -> None:
        """Drop least recently used, unpinned entries until the cache fits (the newest always stays)."""
        for key in list(self._entries):
            if self.bytes_used <= self.capacity_bytes or len(self._entries) <= 1:
                break
            if key in self.pinned or key == next(reversed(self._entries)):
                continue
            del self._entries[key]
            self.metrics.cache_evictions.inc()

    def _publish(self) -> None:
        self.metrics.cache_bytes.set(self.bytes_used)
        self.metrics.cache_entries.set(len(self._entries))
