"""The Triton SGMV kernels against their torch twins, run by Triton's interpreter on CPU.

On CUDA the same comparison runs compiled (bf16 included) in the GPU checks; here the interpreter
executes the kernels' own code (tiles, masks, segment bounds, per-slot ranks) on CPU tensors.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from test_lora_kernels import IN, MAX_RANK, NUM_SLOTS, OUT, distribution, slot_tensors

from loraxpy.kernels import lora

triton = pytest.importorskip("triton", reason="triton is a dev dependency (make install)")

KINDS = ["all-distinct", "uniform", "skewed", "identical", "base-only", "interleaved"]
RANKS = [0, 4, 8, 16, 1, 16, 2, 12, 8]
# out sizes of a fused layer's slices; the odd ones end inside an output tile
FUSED = {"qkv-32-16-16": [32, 16, 16], "qkv-40-17-24": [40, 17, 24], "gate-up-150-150": [150, 150]}
FP32_TOL = {"rtol": 1e-5, "atol": 1e-4}
FP16_TOL = {"rtol": 2e-2, "atol": 2e-2}


def fused_slot_tensors(
    out_sizes: list[int], ranks: list[int], max_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A stacked along the rank [slots, slices*max_rank, IN], B along the output [slots, sum(out), max_rank].

    Slot i has rank ranks[i] in every slice, except slot 3, which leaves slice 1 alone (as an
    adapter may skip k_proj); slot 0 and the rank padding are zeros.
    """
    gen = torch.Generator().manual_seed(len(out_sizes))
    a = torch.zeros(NUM_SLOTS, len(out_sizes) * max_rank, IN)
    b = torch.zeros(NUM_SLOTS, sum(out_sizes), max_rank)
    for i, (a_i, b_i) in enumerate(slice_views(a, b, out_sizes, max_rank)):
        for slot, r in enumerate(ranks):
            if slot != 0 and (slot, i) != (3, 1):
                a_i[slot, :r] = torch.randn(r, IN, generator=gen)
                b_i[slot, :, :r] = torch.randn(b_i.shape[1], r, generator=gen)
    return a, b


def slice_views(
    a: torch.Tensor, b: torch.Tensor, out_sizes: list[int], max_rank: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each slice's (a_i [slots, max_rank, IN], b_i [slots, out_i, max_rank]) as views into the stacks."""
    starts = [sum(out_sizes[:i]) for i in range(len(out_sizes))]
    return [
        (a[:, i * max_rank : (i + 1) * max_rank], b[:, start : start + out])
        for i, (start, out) in enumerate(zip(starts, out_sizes, strict=True))
    ]


@pytest.fixture(scope="module")
def sgmv():
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets it"
    from loraxpy.kernels import lora_triton

    assert lora_triton.available()
    return lora_triton


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_rows", [1, 7, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sgmv_equals_the_torch_twin(sgmv, kind: str, num_rows: int, dtype: torch.dtype) -> None:
    rng = random.Random(num_rows)
    a, b = (t.to(dtype) for t in slot_tensors(RANKS))
    slots = distribution(kind, num_rows, rng)
    x = torch.randn(num_rows, IN, generator=torch.Generator().manual_seed(1)).to(dtype)
    index = torch.tensor(slots)
    segments = sgmv.Segments.build(slots, dict(enumerate(RANKS)), x.device)

    v = sgmv.sgmv_shrink(x, a, segments)
    v_twin = lora.lora_shrink(x.float(), a.float(), index)
    tol = FP32_TOL if dtype == torch.float32 else FP16_TOL
    torch.testing.assert_close(v.float(), v_twin, **tol)

    # expand adds into a column slice of a wider output, as for the fused q/k/v layer
    offset, width = 8, OUT + 24
    y = torch.randn(num_rows, width, generator=torch.Generator().manual_seed(2)).to(dtype)
    expected = y.float().clone()
    expected[:, offset : offset + OUT] += lora.lora_expand(v.float(), b.float(), index)
    sgmv.sgmv_expand_add(v, b, segments, y, sgmv.SliceLayout.build([OUT], [offset], x.device))
    torch.testing.assert_close(y.float(), expected, **tol)


def test_segments_skip_base_rows_and_carry_ranks(sgmv) -> None:
    s = sgmv.Segments.build([0, 0, 3, 3, 5, 0, 3], {3: 8, 5: 16}, torch.device("cpu"))
    assert s.start.tolist() == [2, 4, 6]
    assert s.length.tolist() == [2, 1, 1]
    assert s.slot.tolist() == [3, 5, 3]
    assert s.rank.tolist() == [8, 16, 8]
    assert s.max_length == 2
    empty = sgmv.Segments.build([0, 0], {}, torch.device("cpu"))
    x = torch.randn(2, IN)
    assert torch.equal(sgmv.sgmv_shrink(x, torch.ones(2, MAX_RANK, IN), empty), torch.zeros(2, MAX_RANK))


def test_static_segments_pad_with_empty_runs_and_forget_the_previous_batch(sgmv) -> None:
    """The fixed buffers a CUDA graph reads: a smaller batch after a larger one sees only its own runs."""
    static = sgmv.StaticSegments.allocate(8, torch.device("cpu"))
    first = static.fill([0, 3, 3, 5, 0, 3, 7, 7], {3: 8, 5: 16, 7: 4})
    assert first.start.tolist() == [1, 3, 5, 6, 0, 0, 0, 0] and first.max_length == 8
    s = static.fill([2, 0, 0, 2, 2], {2: 4})
    assert s.start.tolist() == [0, 3, 0, 0, 0]
    assert s.length.tolist() == [1, 2, 0, 0, 0]
    assert s.slot.tolist() == [2, 2, 0, 0, 0] and s.rank.tolist() == [4, 4, 0, 0, 0]
    assert s.max_length == 5  # the grid covers any mix of 5 rows


@pytest.mark.parametrize("kind", KINDS)
def test_sgmv_over_static_segments_equals_the_torch_twin(sgmv, kind: str) -> None:
    rng = random.Random(5)
    a, b = slot_tensors(RANKS)
    static = sgmv.StaticSegments.allocate(16, torch.device("cpu"))
    static.fill(distribution("all-distinct", 16, rng), dict(enumerate(RANKS)))  # stale entries to forget
    slots = distribution(kind, 11, rng)
    segments = static.fill(slots, dict(enumerate(RANKS)))
    x = torch.randn(11, IN, generator=torch.Generator().manual_seed(3))
    index = torch.tensor(slots)
    v = sgmv.sgmv_shrink(x, a, segments)
    torch.testing.assert_close(v, lora.lora_shrink(x, a, index), rtol=1e-5, atol=1e-4)
    y = torch.zeros(11, OUT)
    sgmv.sgmv_expand_add(v, b, segments, y, sgmv.SliceLayout.build([OUT], [0], x.device))
    torch.testing.assert_close(y, lora.lora_expand(v, b, index), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("out_sizes", FUSED.values(), ids=FUSED.keys())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_rows", [1, 7, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_slices_equal_the_torch_twin_slice_by_slice(
    sgmv, out_sizes: list[int], kind: str, num_rows: int, dtype: torch.dtype
) -> None:
    """One shrink and one expand over all slices against the torch twins run once per slice."""
    a, b = (t.to(dtype) for t in fused_slot_tensors(out_sizes, RANKS, MAX_RANK))
    slots = distribution(kind, num_rows, random.Random(num_rows))
    x = torch.randn(num_rows, IN, generator=torch.Generator().manual_seed(1)).to(dtype)
    index = torch.tensor(slots)
    segments = sgmv.Segments.build(slots, dict(enumerate(RANKS)), x.device)
    tol = FP32_TOL if dtype == torch.float32 else FP16_TOL

    v = sgmv.sgmv_shrink(x, a, segments, num_slices=len(out_sizes))
    torch.testing.assert_close(v.float(), lora.lora_shrink(x.float(), a.float(), index), **tol)

    # the slices' columns start past a few leading ones and leave a few after, as in a wider output
    offsets = [8 + sum(out_sizes[:i]) for i in range(len(out_sizes))]
    y = torch.randn(num_rows, 8 + sum(out_sizes) + 5, generator=torch.Generator().manual_seed(2)).to(dtype)
    expected = y.float().clone()
    views = slice_views(a.float(), b.float(), out_sizes, MAX_RANK)
    for i, ((_, b_i), offset) in enumerate(zip(views, offsets, strict=True)):
        v_i = v.float()[:, i * MAX_RANK : (i + 1) * MAX_RANK]
        expected[:, offset : offset + b_i.shape[1]] += lora.lora_expand(v_i, b_i, index)
    sgmv.sgmv_expand_add(v, b, segments, y, sgmv.SliceLayout.build(out_sizes, offsets, x.device))
    torch.testing.assert_close(y.float(), expected, **tol)


def test_rank_padding_and_base_slots_are_never_read_in_any_slice(sgmv) -> None:
    """NaN in slot 0 and past each adapter's rank must not reach the output: those tiles are skipped.

    A max rank of 80 gives two rank tiles per slice in shrink (64 + 16) and five steps in expand.
    """
    max_rank, out_sizes = 80, [24, 40]
    ranks = [0, 4, 80, 70, 64, 65, 1, 12, 8]
    a, b = fused_slot_tensors(out_sizes, ranks, max_rank)
    a_nan, b_nan = a.clone(), b.clone()
    for slot, r in enumerate(ranks):
        for a_i, b_i in slice_views(a_nan, b_nan, out_sizes, max_rank):
            a_i[slot, r:] = float("nan")
            b_i[slot, :, r:] = float("nan")
    slots = distribution("interleaved", 40, random.Random(3))
    x = torch.randn(len(slots), IN, generator=torch.Generator().manual_seed(1))
    index = torch.tensor(slots)
    segments = sgmv.Segments.build(slots, dict(enumerate(ranks)), x.device)

    v = sgmv.sgmv_shrink(x, a_nan, segments, num_slices=2)
    torch.testing.assert_close(v, lora.lora_shrink(x, a, index), **FP32_TOL)
    y = torch.zeros(len(slots), sum(out_sizes))
    sgmv.sgmv_expand_add(v, b_nan, segments, y, sgmv.SliceLayout.build(out_sizes, [0, 24], x.device))
    expected = torch.cat(
        [
            lora.lora_expand(v[:, :max_rank], b[:, :24], index),
            lora.lora_expand(v[:, max_rank:], b[:, 24:], index),
        ],
        dim=1,
    )
    torch.testing.assert_close(y, expected, **FP32_TOL)


def test_slice_layout_cuts_output_tiles_at_slice_ends(sgmv) -> None:
    cpu = torch.device("cpu")
    qkv = sgmv.SliceLayout.build([40, 17, 24], [0, 40, 57], cpu)
    assert qkv.block_n == 64
    assert qkv.tiles.tolist() == [[0, 0, 40, 0], [1, 40, 57, 0], [2, 57, 81, 0]]
    gate_up = sgmv.SliceLayout.build([150, 150], [8, 158], cpu)  # two tiles per slice, y shifted by 8
    assert gate_up.block_n == 128
    assert gate_up.tiles.tolist() == [[0, 0, 150, 8], [0, 128, 150, 8], [1, 150, 300, 8], [1, 278, 300, 8]]
    assert sgmv.SliceLayout.build([4], [0], cpu).block_n == 16  # the smallest tl.dot dim on CUDA


def fused_layer(out_sizes: dict[str, int], ranks: dict[int, int], hidden: int = 32):
    """A ColumnParallelLinear with LoraSlots; the last slot leaves the second slice alone."""
    from loraxpy.worker.layers import ColumnParallelLinear, Shard
    from loraxpy.worker.lora import LoraBatch, LoraSlots

    cpu = torch.device("cpu")
    layer = ColumnParallelLinear(
        hidden, out_sizes, bias=False, shard=Shard(), dtype=torch.float32, device=cpu
    )
    layer.weight.data.normal_()
    batch = LoraBatch(max_rank=16)
    shapes = {name: (hidden, out) for name, out in out_sizes.items()}
    layer.lora = LoraSlots(layer, shapes, batch, num_slots=len(ranks) + 1, max_rank=16, shard=Shard())
    skipped = (max(ranks), list(out_sizes)[1])
    for slot, r in ranks.items():
        for name, (i, o) in shapes.items():
            if (slot, name) != skipped:
                layer.lora.write(slot, name, torch.randn(r, i), torch.randn(o, r))
    return layer, batch


LAYERS = {
    "qkv": {"q_proj": 32, "k_proj": 16, "v_proj": 16},
    "gate-up": {"gate_proj": 40, "up_proj": 40},
}


@pytest.mark.parametrize("out_sizes", LAYERS.values(), ids=LAYERS.keys())
def test_a_fused_qkv_layer_gives_the_same_output_on_both_paths(sgmv, out_sizes: dict[str, int]) -> None:
    """The worker's LoraSlots with the Triton backend (interpreted here) against its torch path."""
    torch.manual_seed(0)
    ranks = {1: 4, 2: 16, 3: 8}
    layer, batch = fused_layer(out_sizes, ranks)
    slots = [0, 0, 2, 2, 2, 1, 3, 3, 0, 1]
    x = torch.randn(len(slots), 32)
    batch.use(slots)
    expected = layer(x)
    batch.segments = sgmv.Segments.build(slots, ranks, x.device)
    got = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    batch.use(None)
    batch.segments = None
    assert not torch.allclose(layer(x), expected)  # the adapters did change the output


@pytest.mark.parametrize("out_sizes", LAYERS.values(), ids=LAYERS.keys())
def test_a_fused_layer_launches_one_shrink_and_one_expand(
    sgmv, monkeypatch: pytest.MonkeyPatch, out_sizes: dict[str, int]
) -> None:
    launches: list[str] = []

    class Counted:
        def __init__(self, name: str, kernel) -> None:
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.kernel[grid]

    kernels = sgmv.jit_kernels()
    for name in ("shrink_kernel", "expand_kernel"):
        monkeypatch.setitem(kernels, name, Counted(name, kernels[name]))
    ranks = {1: 4, 2: 16}
    layer, batch = fused_layer(out_sizes, ranks)
    slots = [1, 1, 0, 2, 1]
    batch.use(slots)
    batch.segments = sgmv.Segments.build(slots, ranks, torch.device("cpu"))
    layer(torch.randn(len(slots), 32))
    assert launches == ["shrink_kernel", "expand_kernel"]
