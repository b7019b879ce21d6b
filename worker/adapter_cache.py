"""The host-memory tier of adapters: parsed adapters kept in RAM, least recently used out first.

Device slots hold the adapters a step may use; this cache holds the ones that recently left (or
were merged), so loading them again skips the disk, the download and the merge. Its budget is in
bytes, because one rank-64 adapter of a large model weighs as much as hundreds of small ones.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

from loraxpy.worker.adapters import LoraAdapter


class HostAdapterCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, LoraAdapter] = OrderedDict()
        self._lock = threading.Lock()  # gRPC serves adapter RPCs from several threads

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable) -> LoraAdapter | None:
        with self._lock:
            adapter = self._entries.get(key)
            if adapter is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return adapter

    def put(self, key: Hashable, adapter: LoraAdapter) -> None:
        """Keeps `adapter` unless it alone exceeds the budget; evicts the least recently used."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            if adapter.nbytes > self.capacity_bytes:
                return
            self._entries[key] = adapter
            self.nbytes += adapter.nbytes
            while self.nbytes > self.capacity_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.nbytes -= evicted.nbytes
