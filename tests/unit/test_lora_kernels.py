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


RANKS = [0, 4, 8, 16, 1, 16, 2, 12, 8]  # slot → rank, padded to MAX_RANK in the slot tensors


def grouped_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """The serving path: lora_add over a plan, into zeros, for a two-slice layer (b split in halves)."""
    plan = lora.LoraPlan.build(slots, dict(enumerate(RANKS)), MAX_RANK, x.device)
    y = torch.zeros(x.shape[0], OUT)
    if plan is None:
        return y
    half = OUT // 2
    return lora.lora_add(x, y, [(a, b[:, :half], 0), (a, b[:, half:], half)], plan)


def row_pattern(kind: str, rng: random.Random) -> list[int]:
    """Batches as a server builds them: runs of rows per request (prefill) and single rows (decode)."""
    if kind == "decode-distinct":
        return list(range(1, NUM_SLOTS))
    if kind == "prefill-distinct":
        return [s for s in range(1, NUM_SLOTS) for _ in range(12)]
    if kind == "long-prefill-among-decodes":
        return [3] * 40 + [1, 2, 4, 5, 0, 6, 7, 8]
    if kind == "gaps-in-slots":
        return [1, 7, 0, 4, 7, 1, 8, 8]
    if kind == "same-adapter-in-two-requests":
        return [2] * 5 + [0] * 3 + [2] * 9 + [5]
    if kind == "random":
        return [rng.randrange(NUM_SLOTS) for _ in range(57)]
    raise ValueError(kind)


GROUPED_KINDS = [
    "decode-distinct",
    "prefill-distinct",
    "long-prefill-among-decodes",
    "gaps-in-slots",
    "same-adapter-in-two-requests",
    "random",
]


@pytest.mark.parametrize("kind", GROUPED_KINDS)
def test_grouped_lora_equals_the_per_segment_loop(kind: str) -> None:
    rng = random.Random(kind)
    a, b = slot_tensors(RANKS)
    slots = row_pattern(kind, rng)
    x = torch.randn(len(slots), IN, generator=torch.Generator().manual_seed(3))
    expected = lora.lora_delta_reference(x, a, b, lora.segments_from_slots(slots))
    torch.testing.assert_close(grouped_delta(x, a, b, slots), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "kind", ["all-distinct", "uniform", "skewed", "identical", "base-only", "interleaved"]
)
@pytest.mark.parametrize("num_rows", [1, 7, 64])
def test_grouped_lora_equals_the_per_row_twin(kind: str, num_rows: int) -> None:
    rng = random.Random(num_rows)
    a, b = slot_tensors(RANKS)
    slots = distribution(kind, num_rows, rng)
    x = torch.randn(num_rows, IN, generator=torch.Generator().manual_seed(1))
    index = torch.tensor(slots)
    expected = lora.lora_expand(lora.lora_shrink(x, a, index), b, index)
    delta = grouped_delta(x, a, b, slots)
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-4)
    assert delta[index == 0].abs().sum() == 0  # rows with no adapter add nothing


@pytest.mark.parametrize("kind", GROUPED_KINDS)
@pytest.mark.parametrize("outs", [(OUT,), (24, 8, 8), (20, 20)])
def test_the_fused_layout_equals_the_per_segment_loop(kind: str, outs: tuple[int, ...]) -> None:
    """The serving path: one interleaved, transposed A stack for every slice of a fused layer."""
    rng = random.Random(kind)
    stacks = [slot_tensors(RANKS, seed=i) for i in range(len(outs))]  # slice i: its own A and B
    a_t = lora.interleave_a([a for a, _ in stacks])
    b_plain, b_slices, offset = [], [], 0
    for (_, b), out in zip(stacks, outs, strict=True):
        b_plain.append(b[:, :out])
        b_slices.append((b[:, :out].transpose(1, 2).contiguous(), offset))  # B^T, as the torch path keeps it
        offset += out
    slots = row_pattern(kind, rng)
    x = torch.randn(len(slots), IN, generator=torch.Generator().manual_seed(3))
    y0 = torch.randn(len(slots), offset, generator=torch.Generator().manual_seed(4))
    plan = lora.LoraPlan.build(slots, dict(enumerate(RANKS)), MAX_RANK, x.device)
    assert plan is not None
    got = lora.lora_add_fused(x, y0.clone(), a_t, b_slices, plan) - y0
    segments = lora.segments_from_slots(slots)
    expected = torch.cat(
        [lora.lora_delta_reference(x, a, b, segments) for (a, _), b in zip(stacks, b_plain, strict=True)],
        dim=1,
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert got[torch.tensor(slots) == 0].abs().sum() == 0  # base rows: y left as it was


def test_a_plan_batches_decode_rows_and_keeps_a_long_prefill_apart() -> None:
    cpu = torch.device("cpu")
    ranks = dict.fromkeys(range(1, 17), 16)
    decode = lora.LoraPlan.build(list(range(1, 17)), ranks, 64, cpu)
    assert decode is not None and len(decode.groups) == 1  # 16 adapters, one batched matmul
    (group,) = decode.groups
    assert (group.first_slot, group.num_slots, group.num_rows, group.rank) == (1, 16, 1, 16)
    assert group.rows is None and group.dest is None  # contiguous rows: views, no gather
    mixed = lora.LoraPlan.build([1] * 64 + list(range(2, 17)), ranks, 64, cpu)
    assert mixed is not None
    assert [(g.first_slot, g.num_slots, g.num_rows) for g in mixed.groups] == [(1, 1, 64), (2, 15, 1)]
    assert lora.LoraPlan.build([0, 0, 0], ranks, 64, cpu) is None  # base rows cost nothing


def test_a_group_is_cut_to_its_own_largest_rank() -> None:
    plan = lora.LoraPlan.build([1, 2, 5], {1: 4, 2: 8, 5: 16}, 64, torch.device("cpu"))
    assert plan is not None
    assert [(g.first_slot, g.num_slots, g.rank) for g in plan.groups] == [(1, 2, 8), (5, 1, 16)]
