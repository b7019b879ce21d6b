"""The disk tier of downloaded adapters (hub and S3): one folder per adapter, least recently used
removed first once they pass a byte budget (--adapter-disk-cache-mib).

Folders in use (being fetched or parsed) are never removed. Only what this worker downloaded lives
here; the operator's own hub cache (HF_HUB_CACHE) is read, never evicted.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

PARTIAL_PREFIX = ".partial-"  # a download in progress; left over after a crash, removed at start


def folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under `folder` (symlinks, like the hub's snapshot links, not followed)."""
    total = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                total += os.lstat(path).st_size
    return total


class DiskCache:
    def __init__(self, root: Path, capacity_bytes: int) -> None:
        self.root = root
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[Path, int] = OrderedDict()  # folder → bytes, least recent first
        self._in_use: Counter[Path] = Counter()
        self._lock = threading.Lock()  # loads run on several threads
        self._scan()

    @property
    def nbytes(self) -> int:
        return sum(self._entries.values())

    def _scan(self) -> None:
        """Takes up what earlier runs left, oldest first; drops half-done downloads."""
        found = []
        for kind in ("hub", "s3"):
            base = self.root / kind
            if not base.is_dir():
                continue
            for folder in base.iterdir():
                if folder.name.startswith(PARTIAL_PREFIX):
                    shutil.rmtree(folder, ignore_errors=True)
                elif not folder.name.startswith(".") and folder.is_dir() and not folder.is_symlink():
                    found.append((folder.stat().st_mtime, folder))
        for _, folder in sorted(found):
            self._entries[folder] = folder_bytes(folder)
        self._evict()

    @contextmanager
    def using(self, folder: Path) -> Iterator[None]:
        """Keeps `folder` while the block runs; then counts it (most recently used) and evicts others."""
        with self._lock:
            self._in_use[folder] += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_use[folder] -= 1
                if self._in_use[folder] <= 0:
                    del self._in_use[folder]
                if folder.is_dir():
                    self._entries[folder] = folder_bytes(folder)
                    self._entries.move_to_end(folder)
                self._evict()

    def _evict(self) -> None:
        total = self.nbytes
        for folder in list(self._entries):
            if total <= self.capacity_bytes:
                return
            if folder in self._in_use:
                continue
            total -= self._entries.pop(folder)
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("removed downloaded adapter %s from the disk cache", folder.name)
