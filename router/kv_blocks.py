"""The KV block allocator: which cache blocks are free, and which full blocks are kept for reuse.

The router owns it; workers store where told. With prefix caching, a full block whose K/V a step
has computed is keyed by a hash chain — its parent's hash, its token ids, and at the root the
adapter's identity — and stays in the cache after its requests end (reference count 0, still
keyed) until an allocation needs the space: such blocks are evicted least recently used first,
and only once no never-keyed block is free. A request that starts with the same tokens under the
same identity takes the keyed blocks instead of computing them.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence


class OutOfBlocksError(RuntimeError):
    """Asked for more blocks than are free; the scheduler should have checked `can_allocate`."""


def chain_hashes(identity: str, token_ids: Sequence[int], block_size: int, known: list[bytes]) -> list[bytes]:
    """The hash of every full block of `token_ids`, extending `known` (hashes of its first blocks).

    Block i's hash is sha256(hash of block i-1, its token ids); the first block's parent is the
    hash of `identity` (the adapter's, never its slot index), so equal tokens under different
    adapters or tenants never share a key."""
    hashes = list(known)
    parent = hashes[-1] if hashes else hashlib.sha256(identity.encode()).digest()
    for i in range(len(hashes), len(token_ids) // block_size):
        tokens = array("I", token_ids[i * block_size : (i + 1) * block_size])
        parent = hashlib.sha256(parent + tokens.tobytes()).digest()
        hashes.append(parent)
    return hashes


class BlockAllocator:
    """Hands out block ids in [0, num_blocks), reference counted; with `enable_caching`, keyed
    full blocks outlive their requests until evicted (least recently used first)."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._free: deque[int] = deque(range(num_blocks))  # unkeyed, reused first-in first-out
        self._evictable: OrderedDict[int, None] = OrderedDict()  # keyed, unreferenced; LRU first
        self._refs: dict[int, int] = {}  # block -> requests holding it (absent: free)
        self._hash_of: dict[int, bytes] = {}
        self._by_hash: dict[bytes, int] = {}
        self.num_hits = 0  # blocks found in the cache by admitted requests
        self.num_misses = 0  # full prompt blocks looked up by admitted requests and not found
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: never-keyed free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks that hold a keyed prefix (in use or evictable)."""
        return len(self._hash_of)

    def blocks_needed(self, num_tokens: int, num_held: int) -> int:
        """Extra blocks a request holding `num_held` blocks needs to store `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def can_allocate(self, n: int, reusing: Sequence[int] = ()) -> bool:
        """Whether `n` new blocks fit once the cached blocks `reusing` are taken (some may be evictable)."""
        taken = sum(1 for b in reusing if b in self._evictable)
        return n + taken <= self.num_free

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocksError(f"asked for {n} blocks, {self.num_free} free")
        blocks = [self._take_free() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def _take_free(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._evictable.popitem(last=False)
        del self._by_hash[self._hash_of.pop(block)]
        self.num_evictions += 1
        return block

    def free(self, blocks: Sequence[int]) -> None:
        """Drops one reference to each block; last blocks first, so a chain's tail is evicted before its head."""
        for b in reversed(blocks):
            refs = self._refs.get(b)
            if refs is None:
                raise ValueError(f"block {b} is not allocated")
            if refs > 1:
                self._refs[b] = refs - 1
                continue
            del self._refs[b]
            if b in self._hash_of:
                self._evictable[b] = None
            else:
                self._free.append(b)

    # ---- prefix caching -------------------------------------------------------------------------

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest run of `hashes` from the first (nothing is taken yet)."""
        if not self.enable_caching:
            return []
        blocks = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def take_cached(self, blocks: Sequence[int], num_looked_up: int) -> None:
        """A request admitted with `blocks` from `lookup` (out of `num_looked_up` full blocks) holds them."""
        for b in blocks:
            if b in self._evictable:
                del self._evictable[b]
                self._refs[b] = 1
            else:
                self._refs[b] += 1
        self.num_hits += len(blocks)
        self.num_misses += num_looked_up - len(blocks)

    def cache(self, block: int, block_hash: bytes) -> None:
        """Keys a held block whose K/V are computed; a key already held by another block stays there."""
        if not self.enable_caching or block_hash in self._by_hash or block in self._hash_of:
            return
        if block not in self._refs:
            raise ValueError(f"block {block} is not allocated")
        self._hash_of[block] = block_hash
        self._by_hash[block_hash] = block
