"""CPU linears whose weights are reordered once, at load, into oneDNN's blocked layout.

`F.linear` on CPU hands a plain [out, in] weight to the BLAS, which repacks it into its own tiles on
every call; at decode batch sizes that repacking is a large share of the multiply (the default
model's 120 decoder matmuls at 16 rows: 75 ms plain, 48 ms packed; its whole decode step at batch
16: 111 ms plain, 95 ms packed, the same tokens; this project's 2-core Xeon, one process, A/B
interleaved). oneDNN's `_reorder_linear_weight` does the packing once and its
`_linear_pointwise` multiplies any number of rows by the packed weight, the same op PyTorch's own
inductor uses when it freezes a CPU model. Results differ from `F.linear` only by fp32 rounding
order (|Δ| ~ 1e-6 on unit-scale outputs); `F.linear` stays the twin, used wherever this is off.

In fp32, below 4 rows the packed path is slower than `F.linear` (the matrix-vector case: the
default model's linears at 1 row took 28-32 ms plain and 45-47 ms packed, at 4 rows 59-63 plain and
45-48 packed, the same 2-core Xeon), and above 32 rows it gains nothing (48-512 rows: packed/plain
0.97-1.16). So `--cpu-weight-layout auto` (the default on CPU) keeps each fp32 plain weight beside
its packed copy and multiplies steps of 1-3 rows and of more than 32 (prefill chunks) with it, at
the cost of a second copy of the linears' weights; bf16 is faster packed at every row count, so
there `auto` keeps only the packed copies.

oneDNN compiles a kernel for each row count it meets (1.7-3.7 ms the first time, then cached; the
worker bounds the caches, worker/cli.py), so the row counts that reach the packed weights are kept
few: 4-32 where the plain weight is kept; with packed weights alone, steps of more than 32 rows are
padded with zero rows to one of eight sizes per doubling (at most 1/8 more rows), so a server's
arbitrary prefill lengths do not compile a kernel each, nor push the decode sizes' out of the cache. `packed` frees the plain weights (half the memory, slower fp32
single-request decode); `plain` packs nothing. A startup self-test packs a small weight and compares
it with `F.linear`; any failure (a build without oneDNN, an unsupported CPU) leaves the plain layout
with a warning under `auto`, and stops the worker under `packed`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from loraxpy.worker.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear

logger = logging.getLogger(__name__)

LAYOUTS = ("auto", "packed", "plain")
PACKED_DTYPES = (torch.float32, torch.bfloat16)
# oneDNN picks its blocking for this many rows; any other row count still runs on the same layout.
BATCH_HINT = 16
PACKED_MIN_ROWS = 4  # fewer rows multiply faster by the plain weight, where it is kept
PACKED_MAX_ROWS = 32  # more rows multiply as fast by the plain weight; without one they are padded


def padded_rows(rows: int) -> int:
    """Row counts above PACKED_MAX_ROWS rounded up to one of eight sizes per doubling (72, 80, ...,
    128, 144, ...): the packed weights meet a bounded number of shapes."""
    if rows <= PACKED_MAX_ROWS:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


class PrepackedLinear(nn.Module):
    """x W^T (+ b) with W in oneDNN's packed layout; with `plain` (the weight itself, not a copy),
    steps of fewer than PACKED_MIN_ROWS rows use it instead."""

    def __init__(self, weight: torch.Tensor, plain: bool = False) -> None:
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), BATCH_HINT)
        self.plain = weight if plain else None
        self.nbytes = weight.numel() * weight.element_size()  # the packed copy's

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [num_tokens, in] -> [num_tokens, out]
        rows = x.shape[0]
        if self.plain is not None and not PACKED_MIN_ROWS <= rows <= PACKED_MAX_ROWS:
            return F.linear(x, self.plain, bias)
        if (padded := padded_rows(rows)) != rows:  # zero rows, dropped from the result
            x = F.pad(x, (0, 0, 0, padded - rows))
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")[:rows]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


def prepack_supported(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when packed weights work here; otherwise why not (said once in the startup log)."""
    if device.type != "cpu":
        return f"the packed layout is for CPU workers, not {device.type}"
    if dtype not in PACKED_DTYPES:
        return f"oneDNN packs float32 and bfloat16 weights, not {dtype}"
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN"
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 40, generator=gen).to(dtype)
    bias = torch.randn(48, generator=gen).to(dtype)
    x = torch.randn(5, 40, generator=gen).to(dtype)
    try:
        with torch.inference_mode():
            got = PrepackedLinear(weight)(x, bias)
    except (RuntimeError, NotImplementedError) as e:
        return f"oneDNN could not run a packed linear: {e}"
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    if not torch.allclose(got.float(), F.linear(x, weight, bias).float(), rtol=tol, atol=tol):
        return "oneDNN's packed linear disagreed with F.linear on a self-test"
    return None


def prepack_model(model: nn.Module, layout: str, device: torch.device, dtype: torch.dtype) -> int:
    """Packs every decoder linear not already replaced (by --quantize) and the LM head; returns the
    bytes of the packed copies (0 when nothing was packed). `auto` keeps the plain weights beside
    them for steps of few rows; `packed` frees them (the LM head's rows stay: see below)."""
    if layout not in LAYOUTS:
        raise ValueError(f"--cpu-weight-layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "plain":
        return 0
    if (why_not := prepack_supported(device, dtype)) is not None:
        if layout == "packed":
            raise ValueError(f"--cpu-weight-layout packed: {why_not}")
        if device.type == "cpu":
            logger.warning("CPU weights stay in the plain layout: %s", why_not)
        return 0
    packed = 0
    # fp32 only: bf16's packed path wins at every row count (default model, one row: 26 ms packed
    # against 35 ms plain per decode step, this 2-core Xeon with AMX)
    few_rows_plain = dtype == torch.float32
    for module in model.modules():
        if isinstance(module, ColumnParallelLinear | RowParallelLinear) and module.quant is None:
            module.quant = PrepackedLinear(module.weight.data, plain=layout == "auto" and few_rows_plain)
            packed += module.quant.nbytes
            if (
                layout == "packed" or not few_rows_plain
            ):  # an expanded zero keeps the shape, dtype and device slots are sized from
                placeholder = torch.zeros((), dtype=dtype, device=device).expand(module.weight.shape)
                module.weight = nn.Parameter(placeholder, requires_grad=False)
        elif isinstance(module, ParallelLMHead):
            # The head keeps its plain rows in any layout: a tied head is the embedding table, and
            # adapters that ship the head are compared with them (ModelRunner._check_base_layers).
            module.quant = PrepackedLinear(module.weight.data, plain=few_rows_plain)
            packed += module.quant.nbytes
    return packed
