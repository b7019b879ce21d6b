"""Multi-LoRA shrink/expand against a per-segment fp32 loop, over segment distributions and mixed ranks."""

from __future__ import annotations

import random

import pytest
import torch

from loraxpy.kernels import lora

IN, OUT, MAX_RANK, NUM_SLOTS = 48, 40, 16, 9


def slot_tensors(ranks: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked, zero-padded adapters; slot 0 (base) is all zeros; slot i has rank ranks[i]."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.zeros(NUM_SLOTS, MAX_RANK, IN)
    b = torch.zeros(NUM_SLOTS, OUT, MAX_RANK)
    for slot, r in enumerate(ranks):
        if slot == 0:
            continue
        a[slot, :r] = torch.randn(r, IN, generator=gen)
        b[slot, :, :r] = torch.randn(OUT, r, generator=gen)
    return a, b


def distribution(kind: str, num_rows: int, rng: random.Random) -> list[int]:
    if kind == "all-distinct":
        return [1 + i % (NUM_SLOTS - 1) for i in range(num_rows)]
    if kind == "uniform":
        return sorted(rng.randrange(NUM_SLOTS) for _ in range(num_rows))
    if kind == "skewed":  # one adapter takes most rows, a few stragglers
        return sorted(rng.choice([3] * 12 + [1, 5, 0]) for _ in range(num_rows))
    if kind == "identical":
        return [4] * num_rows
    if kind == "base-only":
        return [0] * num_rows
    if kind == "interleaved":  # unsorted: per-row indices need not be grouped
        return [rng.randrange(NUM_SLOTS) for _ in range(num_rows)]
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind", ["all-distinct", "uniform", "skewed", "identical", "base-only", "interleaved"]
)
@pytest.mark.parametrize("num_rows", [1, 7, 64])
def test_shrink_expand_equal_the_per_segment_loop(kind: str, num_rows: int) -> None:
    rng = random.Random(num_rows)
    ranks = [0, 4, 8, 16, 1, 16, 2, 12, 8]  # mixed ranks, padded to 16
    a, b = slot_tensors(ranks)
    slots = distribution(kind, num_rows, rng)
    x = torch.randn(num_rows, IN, generator=torch.Generator().manual_seed(1))
    index = torch.tensor(slots)
    delta = lora.lora_expand(lora.lora_shrink(x, a, index), b, index)
    expected = lora.lora_delta_reference(x, a, b, lora.segments_from_slots(slots))
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-4)
    assert delta[index == 0].abs().sum() == 0  # rows with no adapter add nothing


def test_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = slot_tensors([0, 16, 16, 16, 16, 16, 16, 16, 16])
    slots = torch.tensor([random.Random(2).randrange(NUM_SLOTS) for _ in range(50)])
    x = torch.randn(50, IN)
    whole = lora.lora_expand(lora.lora_shrink(x, a, slots), b, slots)
    monkeypatch.setattr(lora, "_GATHER_BUDGET", MAX_RANK * IN * 3)  # three rows per chunk
    torch.testing.assert_close(lora.lora_expand(lora.lora_shrink(x, a, slots), b, slots), whole)


def test_segments_from_slots() -> None:
    assert lora.segments_from_slots([0, 0, 2, 2, 2, 1, 0]) == [(0, 2, 0), (2, 5, 2), (5, 6, 1), (6, 7, 0)]
