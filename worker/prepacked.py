"""CPU linears whose weights are reordered once, at load, into oneDNN's blocked layout.

`F.linear` on CPU hands a plain [out, in] weight to the BLAS, which repacks it into its own tiles on
every call; at decode batch sizes that repacking is a large share of the multiply (the default
model's 120 decoder matmuls at 16 rows: 75 ms plain, 48 ms packed; its whole decode step at batch
16: 111 ms plain, 95 ms packed, the same tokens; this project's 2-core Xeon, one process, A/B
interleaved). oneDNN's `_reorder_linear_weight` does the packing once and its
`_linear_pointwise` multiplies any number of rows by the packed weight, the same op PyTorch's own
inductor uses when it freezes a CPU model. Results differ from `F.linear` only by fp32 rounding
order (|Δ| ~ 1e-6 on unit-scale outputs); `F.linear` stays the twin, used wherever this is off.

In fp32 which is faster depends on the CPU's BLAS. On this project's 2-core Xeon, below 4 rows the
packed path was slower than `F.linear` (the matrix-vector case: the default model's linears at 1
row took 28-32 ms plain and 45-47 ms packed, at 4 rows 59-63 plain and 45-48 packed), and above 32
rows it gained nothing (48-512 rows: packed/plain 0.97-1.16). On a 2-core AMD EPYC, where MKL's
`F.linear` is slow, packed won everywhere (1 row: 29 ms packed against 54 plain; 2 rows: 35
against 95; 16 rows: 41 against 101). So `--cpu-weight-layout auto` (the default on CPU) measures
at load, on the model's own linears: 1, 2 and 3 rows, and 128 (a prefill chunk), each way, and
keeps each fp32 plain weight beside its packed copy for the row counts where `F.linear` wins by
10% or more (`measure_row_ranges`; the log says what it measured and chose). Where packed wins at
every count tried, the plain copies are freed, as with `packed`. bf16 is faster packed at every
row count (the Xeon), so there `auto` keeps only the packed copies without measuring.

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
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraxpy.worker.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear

logger = logging.getLogger(__name__)

LAYOUTS = ("auto", "packed", "plain")
PACKED_DTYPES = (torch.float32, torch.bfloat16)
# oneDNN picks its blocking for this many rows; any other row count still runs on the same layout.
BATCH_HINT = 16
PACKED_MIN_ROWS = 4  # fewer rows multiply faster by the plain weight, where it is kept (the Xeon)
PACKED_MAX_ROWS = 32  # more rows multiply as fast by the plain weight; without one they are padded
CALIBRATION_BYTES = 128 << 20  # of the model's linears timed by measure_row_ranges: past the caches
CALIBRATION_MARGIN = 0.9  # plain is kept for a row count only where packed takes more than 0.9x its time


@dataclass(frozen=True)
class RowRanges:
    """The step sizes a packed linear multiplies by its plain weight, where it keeps one: fewer
    than `packed_min` rows, and more than `packed_max` (None: none)."""

    packed_min: int = PACKED_MIN_ROWS
    packed_max: int | None = PACKED_MAX_ROWS

    def plain(self, rows: int) -> bool:
        return rows < self.packed_min or (self.packed_max is not None and rows > self.packed_max)

    @property
    def needs_plain(self) -> bool:
        return self.packed_min > 1 or self.packed_max is not None

    def describe(self) -> str:
        parts = [f"1-{self.packed_min - 1}" if self.packed_min > 2 else "1"] if self.packed_min > 1 else []
        if self.packed_max is not None:
            parts.append(f"more than {self.packed_max}")
        return " and ".join(parts) + " rows" if parts else "no step"


def padded_rows(rows: int) -> int:
    """Row counts above PACKED_MAX_ROWS rounded up to one of eight sizes per doubling (72, 80, ...,
    128, 144, ...): the packed weights meet a bounded number of shapes."""
    if rows <= PACKED_MAX_ROWS:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


class PrepackedLinear(nn.Module):
    """x W^T (+ b) with W in oneDNN's packed layout; with `plain` (the weight itself, not a copy),
    the step sizes of `ranges` use it instead."""

    def __init__(self, weight: torch.Tensor, plain: bool = False, ranges: RowRanges = RowRanges()) -> None:
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), BATCH_HINT)
        self.plain = weight if plain else None
        self.ranges = ranges
        self.nbytes = weight.numel() * weight.element_size()  # the packed copy's

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [num_tokens, in] -> [num_tokens, out]
        rows = x.shape[0]
        if self.plain is not None and self.ranges.plain(rows):
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


def _pass_seconds(linears: list[PrepackedLinear], rows: int, plain: bool, repeats: int = 3) -> float:
    """The fastest of `repeats` passes (after one untimed) of `rows` rows through every linear."""
    inputs = {w: torch.randn(rows, w) for w in {m.plain.shape[1] for m in linears if m.plain is not None}}
    best = float("inf")
    with torch.inference_mode():
        for i in range(repeats + 1):
            start = time.perf_counter()
            for m in linears:
                assert m.plain is not None
                x = inputs[m.plain.shape[1]]
                if plain:
                    F.linear(x, m.plain)
                else:
                    torch.ops.mkldnn._linear_pointwise(x, m.packed, None, "none", [], "")
            if i:
                best = min(best, time.perf_counter() - start)
    return best


def measure_row_ranges(linears: list[PrepackedLinear]) -> tuple[RowRanges, dict[int, tuple[float, float]]]:
    """Times the first CALIBRATION_BYTES of the linears (each keeping its plain weight) at 1, 2, 3
    and 128 rows, plain and packed, and keeps plain where packed is not at least 10% faster: the
    ranges, and (plain, packed) seconds per row count for the log."""
    sample, total = [], 0
    for m in linears:
        if total >= CALIBRATION_BYTES:
            break
        sample.append(m)
        total += m.nbytes
    times = {
        rows: (_pass_seconds(sample, rows, True), _pass_seconds(sample, rows, False))
        for rows in (1, 2, 3, 128)
    }
    packed_wins = {rows: packed < CALIBRATION_MARGIN * plain for rows, (plain, packed) in times.items()}
    packed_min = PACKED_MIN_ROWS
    while packed_min > 1 and packed_wins[packed_min - 1]:
        packed_min -= 1
    return RowRanges(packed_min, None if packed_wins[128] else PACKED_MAX_ROWS), times


def prepack_model(model: nn.Module, layout: str, device: torch.device, dtype: torch.dtype) -> int:
    """Packs every decoder linear not already replaced (by --quantize) and the LM head; returns the
    bytes of the packed copies (0 when nothing was packed). `auto` keeps the plain weights beside
    them for the step sizes they multiply faster (fp32, measured here); `packed` frees them (the
    LM head's rows stay: see below)."""
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
    # fp32 only: bf16's packed path wins at every row count (default model, one row: 26 ms packed
    # against 35 ms plain per decode step, this 2-core Xeon with AMX)
    keep_plain = layout == "auto" and dtype == torch.float32
    decoder = [
        m
        for m in model.modules()
        if isinstance(m, ColumnParallelLinear | RowParallelLinear) and m.quant is None
    ]
    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
    for module in decoder:
        module.quant = PrepackedLinear(module.weight.data, plain=keep_plain)
    for head in heads:
        # The head keeps its plain rows in any layout: a tied head is the embedding table, and
        # adapters that ship the head are compared with them (ModelRunner._check_base_layers).
        head.quant = PrepackedLinear(head.weight.data, plain=dtype == torch.float32)
    packed_linears = [m.quant for m in (*decoder, *heads) if isinstance(m.quant, PrepackedLinear)]
    ranges = RowRanges(1, None)  # packed at every row count
    if keep_plain and decoder:
        ranges, times = measure_row_ranges([m.quant for m in decoder if isinstance(m.quant, PrepackedLinear)])
        logger.info(
            "CPU linears: plain weights for %s%s (measured at load, ms plain / packed: %s)",
            ranges.describe(),
            ""
            if ranges.needs_plain
            else ": packed is faster at every size tried, the plain copies are freed",
            ", ".join(f"{rows} rows {a * 1e3:.1f} / {b * 1e3:.1f}" for rows, (a, b) in times.items()),
        )
    elif dtype == torch.float32:
        ranges = RowRanges()  # the head's plain rows, at the default ranges
    for m in packed_linears:
        m.ranges = ranges
    if not (keep_plain and ranges.needs_plain):  # the decoder's plain copies go
        for module in decoder:
            assert isinstance(module.quant, PrepackedLinear)
            module.quant.plain = None
            # an expanded zero keeps the shape, dtype and device slots are sized from
            placeholder = torch.zeros((), dtype=dtype, device=device).expand(module.weight.shape)
            module.weight = nn.Parameter(placeholder, requires_grad=False)
    return sum(m.nbytes for m in packed_linears)
