from __future__ import annotations

import pytest

from loraxpy.router.kv_blocks import BlockAllocator, OutOfBlocksError


def test_allocate_and_free_round_trip() -> None:
    alloc = BlockAllocator(num_blocks=4, block_size=16)
    a = alloc.allocate(3)
    assert len(set(a)) == 3 and alloc.num_free == 1
    assert not alloc.can_allocate(2)
    with pytest.raises(OutOfBlocksError):
        alloc.allocate(2)
    alloc.free(a)
    assert alloc.num_free == 4


def test_blocks_needed_counts_only_the_missing_blocks() -> None:
    alloc = BlockAllocator(num_blocks=8, block_size=16)
    assert alloc.blocks_needed(1, 0) == 1
    assert alloc.blocks_needed(16, 1) == 0
    assert alloc.blocks_needed(17, 1) == 1
    assert alloc.blocks_needed(33, 0) == 3


def test_double_free_is_refused() -> None:
    alloc = BlockAllocator(num_blocks=2, block_size=4)
    blocks = alloc.allocate(1)
    alloc.free(blocks)
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free(blocks)
