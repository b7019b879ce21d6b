"""The KV block allocator: which cache blocks are free. The router owns it; workers store where told."""

from __future__ import annotations

from collections import deque


class OutOfBlocksError(RuntimeError):
    """Asked for more blocks than are free; the scheduler should have checked `can_allocate`."""


class BlockAllocator:
    """Hands out block ids in [0, num_blocks); freed blocks are reused first-in first-out."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int, num_held: int) -> int:
        """Extra blocks a request holding `num_held` blocks needs to store `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise ValueError(f"block {b} is not allocated")
            self._used.remove(b)
            self._free.append(b)
