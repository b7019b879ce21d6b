"""The worker's adapters as requests reach them: authorized, fetched, checked and parsed once.

Access is remembered per (canonical name, credential): a request bringing another hub token is
checked at the hub again before it may use what an earlier token fetched, whether it names the
adapter alone or inside a merge. Parsed adapters are kept by identity (a real path, a hub repo at a
commit, an S3 key) in the host-memory cache, so every spelling and every authorized tenant shares
one copy.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from loraxpy.proto.adapter_policy import AdapterIdError, AdapterRef
from loraxpy.worker.adapter_cache import HostAdapterCache
from loraxpy.worker.adapter_disk_cache import DiskCache
from loraxpy.worker.adapter_sources import AdapterSources, SourceOptions
from loraxpy.worker.adapters import AdapterError, AdapterFiles, LoraAdapter
from loraxpy.worker.merge import MergeRequest, merge_adapters

MAX_GRANTS = 4096  # remembered (adapter, credential) pairs; a forgotten one is checked again


class AdapterStore:
    def __init__(
        self,
        options: SourceOptions,
        download_dir: Path,
        disk_cache_bytes: int,
        host_cache_bytes: int,
        parse: Callable[[AdapterFiles], LoraAdapter],
    ) -> None:
        self.sources = AdapterSources(options, DiskCache(download_dir, disk_cache_bytes))
        self.host_cache = HostAdapterCache(host_cache_bytes)
        self.parse = parse
        self._grants: OrderedDict[tuple[AdapterRef, str], str] = OrderedDict()  # → identity
        self._lock = threading.Lock()

    def download(self, adapter_id: str, source: str, api_token: str) -> tuple[int, str]:
        """Checks this request's access at the source (always, never from memory) and fetches the
        adapter's files; returns their bytes and the adapter's own chat template ("": none)."""
        ref = _ref(adapter_id, source)
        with self.sources.fetched(ref, api_token) as fetched:
            self._grant(ref, api_token, fetched.identity)
            return fetched.files.nbytes, fetched.files.chat_template()

    def read(
        self, adapter_id: str, source: str, api_token: str, merge: MergeRequest | None = None
    ) -> LoraAdapter:
        """The parsed adapter (or the merge of several), each part authorized for `api_token`."""
        if merge is None:
            return self._read_one(_ref(adapter_id, source), api_token)[1]
        parts = [self._read_one(_ref(part, source), api_token) for part in merge.adapter_ids]
        key = ("merge", tuple(identity for identity, _ in parts), merge.weights, merge.options)
        merged = self.host_cache.get(key)
        if merged is None:
            merged = merge_adapters([a for _, a in parts], merge.weights, merge.options, seed=merge.seed)
            self.host_cache.put(key, merged)
        return merged

    def _read_one(self, ref: AdapterRef, api_token: str) -> tuple[str, LoraAdapter]:
        with self._lock:
            identity = self._grants.get((ref, self._credential(ref, api_token)))
        adapter = self.host_cache.get(identity) if identity is not None else None
        if identity is not None and adapter is not None:
            return identity, adapter
        with self.sources.fetched(ref, api_token) as fetched:
            self._grant(ref, api_token, fetched.identity)
            adapter = self.host_cache.get(fetched.identity)
            if adapter is None:
                adapter = self.parse(fetched.files)
                self.host_cache.put(fetched.identity, adapter)
        return fetched.identity, adapter

    def _credential(self, ref: AdapterRef, api_token: str) -> str:
        """Whose access a grant records: only hub repos the operator did not allow are per-token."""
        if self.sources.options.policy.is_operators(ref):
            return "operator"
        return hashlib.sha256(api_token.encode()).hexdigest() if api_token else "anonymous"

    def _grant(self, ref: AdapterRef, api_token: str, identity: str) -> None:
        with self._lock:
            key = (ref, self._credential(ref, api_token))
            self._grants[key] = identity
            self._grants.move_to_end(key)
            while len(self._grants) > MAX_GRANTS:
                self._grants.popitem(last=False)


def _ref(adapter_id: str, source: str) -> AdapterRef:
    try:
        return AdapterRef.parse(adapter_id, source)
    except AdapterIdError as e:
        raise AdapterError(str(e)) from None
