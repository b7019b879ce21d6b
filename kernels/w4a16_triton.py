"""Triton w4a16 matmul: y = x @ W^T with W^T kept as GPTQ / AWQ integers, dequantized tile by tile.

The torch twin is `PackedLinear.forward_torch` in `worker/gptq.py` (the whole weight dequantized
to fp32, cast to x's dtype, one matmul). Both read the same tensors, the layout `PackedWeight`
keeps whatever the checkpoint's packing (GPTQ rows, AWQ's interleaved columns, act-order):

- values: uint8 [in / 2, out], byte [r, o] holding rows 2r (low nibble) and 2r + 1 (high) of
  column o (PACKED); other widths and odd row counts one value a byte, [in, out];
- scales, zeros: fp32 [groups, out] (zero points with GPTQ v1's offset already added);
- each row's group: row // run where the rows form runs of equal length (sorted by group at load,
  act-order included), else g_idx [in] gathered per row (GATHER: a row-parallel shard's slice of an
  act-order checkpoint). Act-order checkpoints also permute x's columns, which the caller does.

Each program takes BLOCK_M rows of x and BLOCK_N output columns and walks the input rows
BLOCK_K at a time: it loads the tile's bytes (each byte read for both its rows), shifts out the
row's nibble, subtracts the zero and multiplies by the scale of the row's group in fp32, casts to
x's dtype, as the twin does, and multiplies on tensor cores with an fp32 accumulator. The weight
is never expanded in memory: a decode step reads half a byte per weight instead of two (fp16).
`TRITON_INTERPRET=1` runs the same kernel on CPU, which is how the tests compare it with torch.
"""

from __future__ import annotations

from typing import Any

import torch

from loraxpy.kernels.triton_launch import Launch, cdiv, dot_precision

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

BLOCK_N = 64  # output columns per program


def available() -> bool:
    return triton is not None


def block_m(num_rows: int, dtype: torch.dtype) -> int:
    """Rows of x per program: 16 (the tensor-core minimum) for decode-sized steps, up to 64 (32 in
    fp32, whose 64-row tiles spill on sm_80 and sm_90 beside the dequantized weight tile)."""
    hi = 32 if dtype == torch.float32 else 64
    return max(16, min(hi, 1 << max(0, num_rows - 1).bit_length()))


def _block_k(dtype: torch.dtype) -> int:
    return 16 if dtype == torch.float32 else 64  # fp32: a [BLOCK_K, 64] weight tile of fp32 registers


# A plain function here, JIT-decorated on first use by `jit_kernels()` (so TRITON_INTERPRET set by a
# test takes effect); `kernels/triton_aot.py` compiles the same function.
def w4a16_kernel(
    x_ptr, q_ptr, scales_ptr, zeros_ptr, g_idx_ptr, y_ptr,
    num_rows, in_features, out_features, run,
    stride_xm, stride_qk, stride_sg, stride_ym,
    PACKED: tl.constexpr, GATHER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    col_ok = cols < out_features
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < in_features
        x = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        wmask = k_ok[:, None] & col_ok[None, :]
        if PACKED:  # byte r holds rows 2r (low nibble) and 2r + 1
            b = tl.load(
                q_ptr + (ks // 2)[:, None].to(tl.int64) * stride_qk + cols[None, :], mask=wmask, other=0
            )
            q = (b.to(tl.int32) >> ((ks % 2) * 4)[:, None]) & 0xF
        else:
            q = tl.load(q_ptr + ks[:, None].to(tl.int64) * stride_qk + cols[None, :], mask=wmask, other=0)
            q = q.to(tl.int32)
        if GATHER:  # noqa: SIM108 (a constexpr branch: Triton compiles only one side)
            groups = tl.load(g_idx_ptr + ks, mask=k_ok, other=0)
        else:
            groups = ks // run
        at = groups[:, None].to(tl.int64) * stride_sg + cols[None, :]
        scale = tl.load(scales_ptr + at, mask=wmask, other=0.0)
        zero = tl.load(zeros_ptr + at, mask=wmask, other=0.0)
        w = ((q.to(tl.float32) - zero) * scale).to(x_ptr.dtype.element_ty)
        acc += tl.dot(x, w, input_precision=PRECISION)
    out = y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


_kernels: dict[str, Any] = {}


def jit_kernels() -> dict[str, Any]:
    """The kernel JIT-decorated (in Triton's interpreter when TRITON_INTERPRET=1), by function name."""
    if _kernels or triton is None:
        return _kernels
    _kernels[w4a16_kernel.__name__] = triton.jit(w4a16_kernel)
    return _kernels


def w4a16_launch(
    x: torch.Tensor,
    values: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor | None,
    run: int,
    packed: bool,
    y: torch.Tensor,
) -> Launch:
    """y [rows, out] = x [rows, in] @ ((q - zeros[g]) * scales[g]) with q from `values` (see the module
    docstring); `g_idx` [in] each row's group where `run` is 0, else None (row // run)."""
    assert x.stride(1) == 1 and values.stride(1) == 1 and y.stride(1) == 1
    assert scales.is_contiguous() and zeros.is_contiguous() and scales.shape == zeros.shape
    assert (g_idx is not None) == (run == 0)
    num_rows, in_features = x.shape
    out_features = values.shape[1]
    assert values.shape[0] == (in_features // 2 if packed else in_features) and y.shape == (
        num_rows,
        out_features,
    )
    rows_per_block = block_m(num_rows, x.dtype)
    args = (
        x, values, scales, zeros, g_idx if g_idx is not None else scales, y,
        num_rows, in_features, out_features, max(run, 1),
        x.stride(0), values.stride(0), scales.stride(0), y.stride(0),
    )  # fmt: skip
    constexprs = {
        "PACKED": packed, "GATHER": g_idx is not None,
        "BLOCK_M": rows_per_block, "BLOCK_N": BLOCK_N, "BLOCK_K": _block_k(x.dtype),
        "PRECISION": dot_precision(x.dtype),
    }  # fmt: skip
    grid = (cdiv(num_rows, rows_per_block), cdiv(out_features, BLOCK_N))
    return Launch(w4a16_kernel, grid, args, constexprs)


def w4a16_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor | None,
    run: int,
    packed: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ W^T from the packed integers, into `out` (a [rows, out] view with unit column stride, e.g.
    a fused layer's slice of columns) or a new tensor in x's dtype."""
    x = x if x.stride(1) == 1 else x.contiguous()
    if out is None:
        out = torch.empty(x.shape[0], values.shape[1], dtype=x.dtype, device=x.device)
    if x.shape[0] == 0 or out.shape[1] == 0:
        return out
    w4a16_launch(x, values, scales, zeros, g_idx, run, packed, out).run(jit_kernels())
    return out
