"""Triton SGMV: LoRA shrink and expand over segments of rows that share an adapter slot.

The torch twins are `lora_shrink` / `lora_expand` in `kernels/lora.py` (same slot tensors, same
results). Here each program owns one tile of one segment: it loads the segment's adapter weights
once per tile and multiplies a block of rows with them on tensor cores, so a batch with many
adapters costs one launch per layer, not one per adapter. A fused layer (q/k/v, gate/up) keeps its
slices' A stacked along the rank and their B stacked along the output, so all its slices share one
shrink and one expand launch too. Segments come from the per-token slot list the runner builds on
the host anyway, so no device-to-host sync is added.

- shrink: v[t, i*R:(i+1)*R] = A_i[slot(t)] @ x[t] for every slice i      grid (segment, row tile,
  slice × rank tile); R is the padded max rank, so v holds the slices' rank chunks side by side.
- expand: y[t, off_i:off_i+out_i] += B_i[slot(t)] @ v[t, i*R:(i+1)*R]   grid (segment, row tile,
  output tile); a `SliceLayout` table maps each output tile to its slice, so no tile spans two.

Rows of slot 0 (the base model) are skipped: shrink leaves their v at zero, expand adds nothing.
Each segment also carries its adapter's rank; rank tiles past it are skipped within every slice.
The padded max rank and the tile sizes are compile-time constants; the input feature count is an
argument, so one compiled shrink serves every layer, model and tensor-parallel shard.
`TRITON_INTERPRET=1` runs the same kernels on CPU, which is how the tests compare them with torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from loraxpy.kernels.triton_launch import Launch, cdiv, dot_precision

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

BLOCK_M = 16  # rows per tile (tensor-core minimum)
BLOCK_K = 64  # input features per shrink step
BLOCK_R_EXPAND = 16  # rank per expand step: the smallest tl.dot operand dim on CUDA


def available() -> bool:
    return triton is not None


def _block(n: int, lo: int, hi: int) -> int:
    """The power of two covering n, within [lo, hi]; lo >= 16 keeps every tl.dot dim legal on CUDA."""
    return max(lo, min(hi, 1 << max(0, n - 1).bit_length()))


@dataclass(frozen=True)
class Segments:
    """Runs of rows sharing a slot: int32 [num_segments] tensors on the device, and the longest run."""

    start: torch.Tensor
    length: torch.Tensor
    slot: torch.Tensor
    rank: torch.Tensor
    max_length: int

    @classmethod
    def build(cls, slots: list[int], ranks: dict[int, int], device: torch.device) -> Segments:
        """Segments of `slots` (one per row), skipping slot 0; `ranks` maps slot → adapter rank."""
        runs = segment_runs(slots, ranks)
        data = torch.tensor(runs, dtype=torch.int32).to(device, non_blocking=True)
        return cls(data[0], data[1], data[2], data[3], max(runs[1], default=0))


def segment_runs(slots: list[int], ranks: dict[int, int]) -> list[list[int]]:
    """[starts, lengths, slots, ranks] of the runs of equal nonzero slots in `slots`."""
    starts: list[int] = []
    lengths: list[int] = []
    seg_slots: list[int] = []
    for i, s in enumerate(slots):
        if starts and seg_slots[-1] == s and starts[-1] + lengths[-1] == i:
            lengths[-1] += 1
        elif s != 0:
            starts.append(i)
            lengths.append(1)
            seg_slots.append(s)
    return [starts, lengths, seg_slots, [ranks.get(s, 0) for s in seg_slots]]


@dataclass(frozen=True)
class StaticSegments:
    """Segments in fixed device buffers, for a captured CUDA graph: one entry per row of capacity.

    A batch of `rows` rows uses entries [0, rows): its runs first, then zero-length entries whose
    programs return at once; the grid is sized for `rows` runs of up to `rows` rows, so the same
    launch serves any mix of adapters in that batch size.
    """

    data: torch.Tensor  # [4, capacity] int32: start, length, slot, rank

    @classmethod
    def allocate(cls, capacity: int, device: torch.device) -> StaticSegments:
        return cls(torch.zeros(4, capacity, dtype=torch.int32, device=device))

    def fill(self, slots: list[int], ranks: dict[int, int]) -> Segments:
        rows = len(slots)
        runs = segment_runs(slots, ranks)
        padded = [values + [0] * (rows - len(values)) for values in runs]
        view = self.data[:, :rows]
        view.copy_(torch.tensor(padded, dtype=torch.int32).to(self.data.device, non_blocking=True))
        return Segments(view[0], view[1], view[2], view[3], max_length=rows)


@dataclass(frozen=True)
class SliceLayout:
    """Where a fused layer's slices put their deltas: built once per layer, used by every expand.

    Slice i owns rows [b_start_i, b_start_i + out_i) of the stacked B (b_start_i = sum of the
    earlier out sizes) and output columns [y_offset_i, y_offset_i + out_i). `tiles` is int32
    [num_tiles, 4] on the device: (slice, first B row, end B row of the slice, y column − B row) of
    each BLOCK_N-wide output tile; a slice's last tile is cut at its end, so none spans two slices.
    """

    out_sizes: tuple[int, ...]
    y_offsets: tuple[int, ...]
    block_n: int
    tiles: torch.Tensor

    @classmethod
    def build(cls, out_sizes: list[int], y_offsets: list[int], device: torch.device) -> SliceLayout:
        if len(out_sizes) != len(y_offsets) or not out_sizes:
            raise ValueError(f"{len(out_sizes)} out sizes for {len(y_offsets)} offsets")
        block_n = _block(max(out_sizes), 16, 128)
        rows: list[list[int]] = []
        b_start = 0
        for i, (size, y_offset) in enumerate(zip(out_sizes, y_offsets, strict=True)):
            end = b_start + size
            rows += [[i, col, end, y_offset - b_start] for col in range(b_start, end, block_n)]
            b_start = end
        tiles = torch.tensor(rows, dtype=torch.int32).reshape(-1, 4).to(device)
        return cls(tuple(out_sizes), tuple(y_offsets), block_n, tiles)

    @property
    def num_slices(self) -> int:
        return len(self.out_sizes)


# The kernels are plain functions here and JIT-decorated on first use by `jit_kernels()` (so
# TRITON_INTERPRET set by a test takes effect); `kernels/triton_aot.py` compiles the same functions.
def shrink_kernel(
    x_ptr, a_ptr, v_ptr,
    seg_start, seg_len, seg_slot, seg_rank,
    in_features, stride_xm, stride_as, stride_ar, stride_vm,
    MAX_RANK: tl.constexpr, RANK_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    seg = tl.program_id(0)
    tile = tl.program_id(1)
    part = tl.program_id(2) // RANK_TILES  # the slice: its rank chunk in A's rows and v's columns
    rtile = tl.program_id(2) % RANK_TILES
    length = tl.load(seg_len + seg)
    rank = tl.minimum(tl.load(seg_rank + seg), MAX_RANK)  # never reach into the next slice
    if tile * BLOCK_M >= length or rtile * BLOCK_R >= rank:
        return
    start = tl.load(seg_start + seg)
    slot = tl.load(seg_slot + seg).to(tl.int64)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < length
    ranks = rtile * BLOCK_R + tl.arange(0, BLOCK_R)
    rank_ok = ranks < rank
    cols = part * MAX_RANK + ranks
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < in_features
        x = tl.load(
            x_ptr + (start + rows)[:, None].to(tl.int64) * stride_xm + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        a = tl.load(
            a_ptr + slot * stride_as + cols[None, :] * stride_ar + ks[:, None],
            mask=rank_ok[None, :] & k_ok[:, None],
            other=0.0,
        )  # [BLOCK_K, BLOCK_R]: this slice's A[slot] transposed
        acc += tl.dot(x, a, input_precision=PRECISION)
    out = v_ptr + (start + rows)[:, None].to(tl.int64) * stride_vm + cols[None, :]
    tl.store(out, acc.to(v_ptr.dtype.element_ty), mask=row_ok[:, None] & rank_ok[None, :])


def expand_kernel(
    v_ptr, b_ptr, y_ptr, tiles,
    seg_start, seg_len, seg_slot, seg_rank,
    stride_vm, stride_bs, stride_bn, stride_ym,
    MAX_RANK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    seg = tl.program_id(0)
    tile = tl.program_id(1)
    ntile = tl.program_id(2)
    length = tl.load(seg_len + seg)
    if tile * BLOCK_M >= length:
        return
    part = tl.load(tiles + ntile * 4)
    col0 = tl.load(tiles + ntile * 4 + 1)
    col_end = tl.load(tiles + ntile * 4 + 2)
    y_shift = tl.load(tiles + ntile * 4 + 3)
    start = tl.load(seg_start + seg)
    slot = tl.load(seg_slot + seg).to(tl.int64)
    rank = tl.minimum(tl.load(seg_rank + seg), MAX_RANK)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < length
    cols = col0 + tl.arange(0, BLOCK_N)  # rows of the stacked B
    col_ok = cols < col_end
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, MAX_RANK, BLOCK_R):  # compile-time bound; ranks past this adapter's skip
        if r0 < rank:
            rs = r0 + tl.arange(0, BLOCK_R)
            r_ok = rs < rank
            v = tl.load(
                v_ptr + (start + rows)[:, None].to(tl.int64) * stride_vm + part * MAX_RANK + rs[None, :],
                mask=row_ok[:, None] & r_ok[None, :],
                other=0.0,
            )  # [BLOCK_M, BLOCK_R]: this slice's rank chunk of v
            b = tl.load(
                b_ptr + slot * stride_bs + cols[None, :].to(tl.int64) * stride_bn + rs[:, None],
                mask=col_ok[None, :] & r_ok[:, None],
                other=0.0,
            )  # [BLOCK_R, BLOCK_N]: B[slot] transposed
            acc += tl.dot(v, b, input_precision=PRECISION)
    out = y_ptr + (start + rows)[:, None].to(tl.int64) * stride_ym + y_shift + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    y = tl.load(out, mask=mask, other=0.0)
    tl.store(out, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


_kernels: dict[str, Any] = {}
# A segment's start, length, slot and rank are rows of one [4, n] tensor, so the alignment of their
# pointers changes with the number of segments; specialised on it, each kernel would compile twice
# while serving (a scalar load per program gains nothing from it).
_SEGMENT_POINTERS = ["seg_start", "seg_len", "seg_slot", "seg_rank"]


def jit_kernels() -> dict[str, Any]:
    """The kernels JIT-decorated (in Triton's interpreter when TRITON_INTERPRET=1), by function name."""
    if _kernels or triton is None:
        return _kernels
    for kernel in (shrink_kernel, expand_kernel):
        _kernels[kernel.__name__] = triton.jit(do_not_specialize_on_alignment=_SEGMENT_POINTERS)(kernel)
    return _kernels


def shrink_launch(
    x: torch.Tensor, a: torch.Tensor, v: torch.Tensor, segments: Segments, num_slices: int
) -> Launch:
    """The shrink launch: rank tiles of each slice from the padded max rank R = a.shape[1] / num_slices."""
    # x: [rows, in]; a: [slots, num_slices * R, in]; v: [rows, num_slices * R]
    assert x.stride(1) == 1 and a.stride(2) == 1 and v.stride(1) == 1 and a.shape[1] % num_slices == 0
    max_rank = a.shape[1] // num_slices
    block_r = _block(max_rank, 16, 64)
    rank_tiles = cdiv(max_rank, block_r)
    args = (
        x, a, v,
        segments.start, segments.length, segments.slot, segments.rank,
        x.shape[1], x.stride(0), a.stride(0), a.stride(1), v.stride(0),
    )  # fmt: skip
    constexprs = {
        "MAX_RANK": max_rank, "RANK_TILES": rank_tiles,
        "BLOCK_M": BLOCK_M, "BLOCK_R": block_r, "BLOCK_K": BLOCK_K, "PRECISION": dot_precision(x.dtype),
    }  # fmt: skip
    grid = (segments.start.numel(), cdiv(segments.max_length, BLOCK_M), num_slices * rank_tiles)
    return Launch(shrink_kernel, grid, args, constexprs)


def expand_launch(
    v: torch.Tensor, b: torch.Tensor, segments: Segments, y: torch.Tensor, layout: SliceLayout
) -> Launch:
    """The expand launch: one program per (segment, row tile, output tile of the layout)."""
    # v: [rows, num_slices * R]; b: [slots, sum of out_i, R]; y: [rows, >= the slices' columns]
    assert v.stride(1) == 1 and b.stride(2) == 1 and y.stride(1) == 1
    assert b.shape[1] == sum(layout.out_sizes) and v.shape[1] == layout.num_slices * b.shape[2]
    args = (
        v, b, y, layout.tiles,
        segments.start, segments.length, segments.slot, segments.rank,
        v.stride(0), b.stride(0), b.stride(1), y.stride(0),
    )  # fmt: skip
    constexprs = {
        "MAX_RANK": b.shape[2], "BLOCK_M": BLOCK_M, "BLOCK_N": layout.block_n, "BLOCK_R": BLOCK_R_EXPAND,
        "PRECISION": dot_precision(v.dtype),
    }  # fmt: skip
    grid = (segments.start.numel(), cdiv(segments.max_length, BLOCK_M), layout.tiles.shape[0])
    return Launch(expand_kernel, grid, args, constexprs)


def sgmv_shrink(x: torch.Tensor, a: torch.Tensor, segments: Segments, num_slices: int = 1) -> torch.Tensor:
    """v[t] = a[slot(t)] @ x[t] (zeros for base rows): a [slots, num_slices*R, in] → v [rows, num_slices*R].

    `a` stacks the slices' rank-padded A along the rank; rank tiles past a segment's rank are
    skipped in every slice's R-wide chunk (those rows of A are zero padding anyway).
    """
    v = torch.zeros(x.shape[0], a.shape[1], dtype=x.dtype, device=x.device)
    if segments.max_length == 0:
        return v
    shrink_launch(x, a, v, segments, num_slices).run(jit_kernels())
    return v


def sgmv_expand_add(
    v: torch.Tensor, b: torch.Tensor, segments: Segments, y: torch.Tensor, layout: SliceLayout
) -> torch.Tensor:
    """y[t, off_i : off_i+out_i] += b_i[slot(t)] @ v[t, i*R : (i+1)*R] for every slice i, in place.

    b: [slots, sum of out_i, R], the slices' B stacked along the output (b_i = its rows
    b_start_i..+out_i); v: [rows, num_slices*R] from `sgmv_shrink`; off_i = layout.y_offsets[i].
    """
    if segments.max_length == 0:
        return y
    expand_launch(v, b, segments, y, layout).run(jit_kernels())
    return y
