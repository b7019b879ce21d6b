"""Triton grouped expert GEMMs: every expert of an MoE layer in one launch per projection.

The torch twin is `Experts.forward` in `worker/moe.py` (one sort of the routed rows by expert, a
loop over experts, one index_add). Here the routed rows, sorted by expert, are cut into blocks of
BLOCK_M rows that never span two experts; each program takes one block and one tile of output
columns, loads that expert's weights for it and multiplies on tensor cores:

- gate_up: h[r] = act(x[token(r)] @ gate_e^T) * (x[token(r)] @ up_e^T)     grid (row block, I tile)
  with act silu or tanh-gelu (a constexpr), both halves accumulated in one program, so the
  [rows, 2I] gate/up product is never written.
- down:    y[route(r)] = w[route(r)] * (h[r] @ down_e^T)                  grid (row block, H tile)
  written at the routed row's own place route(r) = token * top_k + k, so the combination is a sum over k
  (torch), in a fixed order: no atomics, the same result every run.

The row blocks come from the per-expert counts on the device (`RowBlocks.build`: scatter_add,
cumsum, searchsorted), and the grid is sized by the most blocks any routing can need, so nothing is
read back on the host; blocks past the last expert's return at once. The hidden and intermediate
sizes are arguments and the experts and top-k live in the row tables, so one compiled kernel (per
dtype and rows per block) serves every layer and MoE model.
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

ACTIVATIONS = ("silu", "gelu_tanh")
BLOCK_N = 64  # output columns per program


def available() -> bool:
    return triton is not None


def block_m(num_rows: int, num_experts: int, dtype: torch.dtype) -> int:
    """Rows per block: 16 (the tensor-core minimum) for decode-sized steps, up to 64 for prefill
    (32 in fp32, whose two 64 x 64 accumulators of gate_up would spill on sm_80)."""
    per_expert = cdiv(num_rows, num_experts)
    hi = 32 if dtype == torch.float32 else 64
    return max(16, min(hi, 1 << max(0, per_expert - 1).bit_length()))


def max_blocks(num_rows: int, num_experts: int, block_m: int) -> int:
    """The most row blocks any routing of num_rows rows can need: each expert with rows wastes at
    most one partly filled block, so sum of ceil(count / block_m) <= num_rows / block_m + experts."""
    return cdiv(num_rows, block_m) + min(num_experts, num_rows)


def _block_k(dtype: torch.dtype) -> int:
    return 32 if dtype == torch.float32 else 64  # fp32 tiles take twice the shared memory


@dataclass(frozen=True)
class RowBlocks:
    """The routed rows sorted by expert, in blocks of `block_m` rows within one expert.

    `order` [rows] is the routed row (token * top_k + k) at each sorted position and `tokens`
    [rows] its token; `data` is int32 [max_blocks, 3]: each block's expert (-1 past the last
    block), its first sorted row and the end of its expert's sorted rows.
    """

    order: torch.Tensor
    tokens: torch.Tensor
    data: torch.Tensor
    block_m: int

    @property
    def max_blocks(self) -> int:
        return self.data.shape[0]

    @classmethod
    def build(cls, ids: torch.Tensor, num_experts: int, block_m: int) -> RowBlocks:
        """From the router's expert ids [tokens, top_k], on their device, without a host sync."""
        flat = ids.flatten()
        rows = flat.numel()
        order = flat.argsort(stable=True)
        # not torch.bincount: on CUDA it reads the largest id back on the host
        counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        ends = counts.cumsum(0)
        blocks = (counts + block_m - 1) // block_m
        block_ends = blocks.cumsum(0)
        index = torch.arange(max_blocks(rows, num_experts, block_m), device=flat.device)
        expert = torch.searchsorted(block_ends, index, right=True)
        e = expert.clamp(max=num_experts - 1)
        first = ends[e] - counts[e] + (index - (block_ends[e] - blocks[e])) * block_m
        expert = torch.where(expert < num_experts, expert, -1)
        data = torch.stack([expert, first, ends[e]], dim=1).to(torch.int32)
        return cls(order, order // ids.shape[1], data, block_m)


# The kernels are plain functions here and JIT-decorated on first use by `jit_kernels()` (so
# TRITON_INTERPRET set by a test takes effect); `kernels/triton_aot.py` compiles the same functions.
def gate_up_kernel(
    x_ptr, w_ptr, h_ptr, tokens_ptr, blocks_ptr,
    hidden, inter, stride_xm, stride_we, stride_wn, stride_hm,
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    ntile = tl.program_id(1)
    expert = tl.load(blocks_ptr + block * 3)
    if expert < 0:
        return
    first = tl.load(blocks_ptr + block * 3 + 1)
    end = tl.load(blocks_ptr + block * 3 + 2)
    rows = first + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    tokens = tl.load(tokens_ptr + rows, mask=row_ok, other=0)
    cols = ntile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    w = w_ptr + expert.to(tl.int64) * stride_we
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        x = tl.load(
            x_ptr + tokens[:, None].to(tl.int64) * stride_xm + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        wmask = col_ok[None, :] & k_ok[:, None]
        w_gate = tl.load(w + cols[None, :].to(tl.int64) * stride_wn + ks[:, None], mask=wmask, other=0.0)
        w_up = tl.load(
            w + (inter + cols)[None, :].to(tl.int64) * stride_wn + ks[:, None], mask=wmask, other=0.0
        )
        gate += tl.dot(x, w_gate, input_precision=PRECISION)
        up += tl.dot(x, w_up, input_precision=PRECISION)
    if ACTIVATION == "silu":
        h = gate * tl.sigmoid(gate) * up
    else:  # tanh-gelu: 0.5 g (1 + tanh(z)) = g * sigmoid(2z), z = sqrt(2/pi) (g + 0.044715 g^3)
        z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        h = gate * tl.sigmoid(2.0 * z) * up
    out = h_ptr + rows[:, None].to(tl.int64) * stride_hm + cols[None, :]
    tl.store(out, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def down_kernel(
    h_ptr, w_ptr, y_ptr, order_ptr, blocks_ptr, weights_ptr,
    hidden, inter, stride_hm, stride_we, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    ntile = tl.program_id(1)
    expert = tl.load(blocks_ptr + block * 3)
    if expert < 0:
        return
    first = tl.load(blocks_ptr + block * 3 + 1)
    end = tl.load(blocks_ptr + block * 3 + 2)
    rows = first + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    routed = tl.load(order_ptr + rows, mask=row_ok, other=0)  # token * top_k + k
    cols = ntile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    w = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < inter
        h = tl.load(
            h_ptr + rows[:, None].to(tl.int64) * stride_hm + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        wd = tl.load(
            w + cols[None, :].to(tl.int64) * stride_wn + ks[:, None],
            mask=col_ok[None, :] & k_ok[:, None],
            other=0.0,
        )  # [BLOCK_K, BLOCK_N]: down_e transposed
        acc += tl.dot(h, wd, input_precision=PRECISION)
    weight = tl.load(weights_ptr + routed, mask=row_ok, other=0.0)
    out = y_ptr + routed[:, None].to(tl.int64) * stride_ym + cols[None, :]
    tl.store(out, (acc * weight[:, None]).to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


_kernels: dict[str, Any] = {}


def jit_kernels() -> dict[str, Any]:
    """The kernels JIT-decorated (in Triton's interpreter when TRITON_INTERPRET=1), by function name."""
    if _kernels or triton is None:
        return _kernels
    for kernel in (gate_up_kernel, down_kernel):
        _kernels[kernel.__name__] = triton.jit(kernel)
    return _kernels


def gate_up_launch(
    x: torch.Tensor, gate_up: torch.Tensor, h: torch.Tensor, blocks: RowBlocks, activation: str
) -> Launch:
    """h [rows, I] (sorted by expert) = act(gate) * up of each routed row; gate_up [E, 2I, hidden]."""
    assert x.stride(1) == 1 and gate_up.stride(2) == 1 and h.stride(1) == 1 and activation in ACTIVATIONS
    _, two_inter, hidden = gate_up.shape
    inter = two_inter // 2
    args = (
        x, gate_up, h, blocks.tokens, blocks.data,
        hidden, inter, x.stride(0), gate_up.stride(0), gate_up.stride(1), h.stride(0),
    )  # fmt: skip
    constexprs = {
        "ACTIVATION": activation,
        "BLOCK_M": blocks.block_m, "BLOCK_N": BLOCK_N, "BLOCK_K": _block_k(x.dtype),
        "PRECISION": dot_precision(x.dtype),
    }  # fmt: skip
    return Launch(gate_up_kernel, (blocks.max_blocks, cdiv(inter, BLOCK_N)), args, constexprs)


def down_launch(
    h: torch.Tensor, down: torch.Tensor, y: torch.Tensor, blocks: RowBlocks, weights: torch.Tensor
) -> Launch:
    """y [tokens * top_k, hidden] at each routed row = weight * (h @ down_e^T); down [E, hidden, I]."""
    assert h.stride(1) == 1 and down.stride(2) == 1 and y.stride(1) == 1 and weights.is_contiguous()
    _, hidden, inter = down.shape
    args = (
        h, down, y, blocks.order, blocks.data, weights,
        hidden, inter, h.stride(0), down.stride(0), down.stride(1), y.stride(0),
    )  # fmt: skip
    constexprs = {
        "BLOCK_M": blocks.block_m, "BLOCK_N": BLOCK_N,
        "BLOCK_K": _block_k(h.dtype), "PRECISION": dot_precision(h.dtype),
    }  # fmt: skip
    return Launch(down_kernel, (blocks.max_blocks, cdiv(hidden, BLOCK_N)), args, constexprs)


def grouped_experts(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """sum over k of weights[t, k] * expert_{ids[t, k]}(x[t]): the twin of `Experts.forward`.

    x [tokens, hidden]; gate_up [E, 2I, hidden] (gate rows, then up rows); down [E, hidden, I];
    weights (fp32) and ids [tokens, top_k]. Two launches, then a sum over k in fp32.
    """
    num_tokens, top_k = ids.shape
    if num_tokens == 0:
        return torch.zeros_like(x)
    num_experts = gate_up.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    blocks = RowBlocks.build(ids, num_experts, block_m(num_tokens * top_k, num_experts, x.dtype))
    h = torch.empty(num_tokens * top_k, gate_up.shape[1] // 2, dtype=x.dtype, device=x.device)
    gate_up_launch(x, gate_up, h, blocks, activation).run(jit_kernels())
    y = torch.empty(num_tokens * top_k, down.shape[1], dtype=x.dtype, device=x.device)
    down_launch(h, down, y, blocks, weights.float().contiguous()).run(jit_kernels())
    return y.view(num_tokens, top_k, -1).sum(dim=1, dtype=torch.float32).to(x.dtype)
