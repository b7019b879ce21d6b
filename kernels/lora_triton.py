"""Triton SGMV: LoRA shrink and expand over segments of rows that share an adapter slot.

The torch twins are `lora_shrink` / `lora_expand` in `kernels/lora.py` (same slot tensors, same
results). Here each program owns one tile of one segment: it loads the segment's adapter weights
once per tile and multiplies a block of rows with them on tensor cores, so a batch with many
adapters costs one launch per layer slice, not one per adapter. Segments come from the per-token
slot list the runner builds on the host anyway, so no device-to-host sync is added.

- shrink: v[t, :] = A[slot(t)] @ x[t]        grid (segment, row tile, rank tile)
- expand: y[t, off:off+out] += B[slot(t)] @ v[t]   grid (segment, row tile, output tile); the add is
  fused into the layer's output (a column slice of the fused q/k/v or gate/up output).

Rows of slot 0 (the base model) are skipped: shrink leaves their v at zero, expand adds nothing.
Each segment also carries its adapter's rank; rank tiles past it are skipped. Feature sizes and
the padded max rank are compile-time constants (a few distinct values per model).
`TRITON_INTERPRET=1` runs the same kernels on CPU, which is how the tests compare them with torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

BLOCK_M = 16  # rows per tile (tensor-core minimum)


def available() -> bool:
    return triton is not None


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
        data = torch.tensor(
            [starts, lengths, seg_slots, [ranks.get(s, 0) for s in seg_slots]], dtype=torch.int32
        ).to(device, non_blocking=True)
        return cls(data[0], data[1], data[2], data[3], max(lengths, default=0))


_kernels: dict[str, Any] = {}


def _build() -> dict[str, Any]:
    """JIT-decorates the kernels on first use (so TRITON_INTERPRET set by a test takes effect)."""
    if _kernels or triton is None:
        return _kernels

    @triton.jit
    def shrink_kernel(
        x_ptr, a_ptr, v_ptr,
        seg_start, seg_len, seg_slot, seg_rank,
        stride_xm, stride_as, stride_ar, stride_vm,
        IN_FEATURES: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        seg = tl.program_id(0)
        tile = tl.program_id(1)
        rtile = tl.program_id(2)
        length = tl.load(seg_len + seg)
        rank = tl.load(seg_rank + seg)
        if tile * BLOCK_M >= length or rtile * BLOCK_R >= rank:
            return
        start = tl.load(seg_start + seg)
        slot = tl.load(seg_slot + seg).to(tl.int64)
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < length
        ranks = rtile * BLOCK_R + tl.arange(0, BLOCK_R)
        rank_ok = ranks < rank
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, IN_FEATURES, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < IN_FEATURES
            x = tl.load(
                x_ptr + (start + rows)[:, None].to(tl.int64) * stride_xm + ks[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            a = tl.load(
                a_ptr + slot * stride_as + ranks[None, :] * stride_ar + ks[:, None],
                mask=rank_ok[None, :] & k_ok[:, None],
                other=0.0,
            )  # [BLOCK_K, BLOCK_R]: A[slot] transposed
            acc += tl.dot(x, a)
        out = v_ptr + (start + rows)[:, None].to(tl.int64) * stride_vm + ranks[None, :]
        tl.store(out, acc.to(v_ptr.dtype.element_ty), mask=row_ok[:, None] & rank_ok[None, :])

    @triton.jit
    def expand_kernel(
        v_ptr, b_ptr, y_ptr,
        seg_start, seg_len, seg_slot, seg_rank,
        out_features, y_offset,
        stride_vm, stride_bs, stride_bn, stride_ym,
        MAX_RANK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        seg = tl.program_id(0)
        tile = tl.program_id(1)
        ntile = tl.program_id(2)
        length = tl.load(seg_len + seg)
        if tile * BLOCK_M >= length:
            return
        start = tl.load(seg_start + seg)
        slot = tl.load(seg_slot + seg).to(tl.int64)
        rank = tl.load(seg_rank + seg)
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < length
        cols = ntile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < out_features
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, MAX_RANK, BLOCK_R):  # compile-time bound; ranks past this adapter's skip
            if r0 < rank:
                rs = r0 + tl.arange(0, BLOCK_R)
                r_ok = rs < rank
                v = tl.load(
                    v_ptr + (start + rows)[:, None].to(tl.int64) * stride_vm + rs[None, :],
                    mask=row_ok[:, None] & r_ok[None, :],
                    other=0.0,
                )
                b = tl.load(
                    b_ptr + slot * stride_bs + cols[None, :].to(tl.int64) * stride_bn + rs[:, None],
                    mask=col_ok[None, :] & r_ok[:, None],
                    other=0.0,
                )  # [BLOCK_R, BLOCK_N]: B[slot] transposed
                acc += tl.dot(v, b)
        out = y_ptr + (start + rows)[:, None].to(tl.int64) * stride_ym + y_offset + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        y = tl.load(out, mask=mask, other=0.0)
        tl.store(out, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)

    _kernels.update(shrink=shrink_kernel, expand=expand_kernel)
    return _kernels


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def sgmv_shrink(x: torch.Tensor, a: torch.Tensor, segments: Segments) -> torch.Tensor:
    """v [num_rows, max_rank] = A[slot] @ x per row (zeros for base rows). a: [slots, max_rank, in]."""
    v = torch.zeros(x.shape[0], a.shape[1], dtype=x.dtype, device=x.device)
    if segments.max_length == 0:
        return v
    assert x.stride(1) == 1 and a.stride(2) == 1
    block_r = _block(a.shape[1], 16, 64)
    grid = (
        segments.start.numel(),
        triton.cdiv(segments.max_length, BLOCK_M),
        triton.cdiv(a.shape[1], block_r),
    )
    _build()["shrink"][grid](
        x, a, v,
        segments.start, segments.length, segments.slot, segments.rank,
        x.stride(0), a.stride(0), a.stride(1), v.stride(0),
        IN_FEATURES=x.shape[1], BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=64,
    )  # fmt: skip
    return v


def sgmv_expand_add(
    v: torch.Tensor, b: torch.Tensor, segments: Segments, y: torch.Tensor, y_offset: int = 0
) -> torch.Tensor:
    """y[:, y_offset : y_offset + out] += B[slot] @ v per row, in place. b: [slots, out, max_rank]."""
    if segments.max_length == 0:
        return y
    assert v.stride(1) == 1 and b.stride(2) == 1 and y.stride(1) == 1
    out_features = b.shape[1]
    block_n = _block(out_features, 16, 128)
    grid = (
        segments.start.numel(),
        triton.cdiv(segments.max_length, BLOCK_M),
        triton.cdiv(out_features, block_n),
    )
    _build()["expand"][grid](
        v, b, y,
        segments.start, segments.length, segments.slot, segments.rank,
        out_features, y_offset,
        v.stride(0), b.stride(0), b.stride(1), y.stride(0),
        MAX_RANK=b.shape[2], BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_R=16,
    )  # fmt: skip
    return y
