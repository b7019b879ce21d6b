"""`int4_linear` (kernels/cpu_int4.cpp) against its torch twins: `PackedLinear.forward_torch` (GPTQ /
AWQ: dequantize, then matmul) and a float64 product of the integers, zeros and scales drawn here;
`GgufLinear`'s dequantize-then-matmul over the gguf package's own Q4_0 / Q4_1 blocks.

The kernel expands each weight with the twin's own operations (no fused rounding), so the results
differ only by the order of the fp32 sums."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from loraxpy.kernels import cpu_fused
from loraxpy.worker.gptq import PackedLinear, PackedWeight

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler to build the ops"
)

IN = 104  # groups of 48: runs of 48, 48 and 8 rows (the last group shorter, as GPTQ / AWQ write it)
ROWS = (1, 3, 8, 9, 17, 33)  # one tile, a partial one, several, and prefill-sized
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.fixture(scope="module")
def ops():
    module = cpu_fused.load()
    assert module is not None, cpu_fused.unavailable_reason()  # a compiler is here: it must build
    return module


def drawn_weight(
    seed: int, out: int, group: int, act_order: bool = False
) -> tuple[PackedWeight, torch.Tensor]:
    """A PackedWeight of random 4-bit values, zeros and scales, and its W^T [IN, out] in float64."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-IN // group)
    g_idx = torch.arange(IN) // group
    if act_order:  # rows quantized in another order: row perm[j] in group j // group
        g_idx = torch.empty_like(g_idx).index_copy_(0, torch.randperm(IN, generator=gen), g_idx)
    q = torch.randint(0, 16, (IN, out), generator=gen)
    zeros = torch.randint(0, 16, (groups, out), generator=gen).float()
    scales = torch.rand(groups, out, generator=gen) * 0.05 + 0.001
    w_t = (q.double() - zeros.double()[g_idx]) * scales.double()[g_idx]
    return PackedWeight(4, q, zeros, scales, g_idx), w_t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("out", "group", "act_order"),
    [(72, 48, False), (64, IN, False), (40, 16, True)],
    ids=["groups of 48, 72 columns", "one group", "act-order groups of 16"],
)
def test_int4_linear_equals_dequantize_then_matmul(ops, dtype, out, group, act_order):
    part, w_t = drawn_weight(out, out, group, act_order)
    assert part.packed and part.run and (part.perm is not None) == act_order
    linear = PackedLinear([part])
    assert linear.can_use_cpu_kernel
    linear.cpu_kernel = ops
    bias = torch.randn(out).to(dtype)
    for rows in ROWS:
        x = torch.randn(rows, IN, generator=torch.Generator().manual_seed(rows)).to(dtype)
        got = linear(x, bias)
        assert got.dtype == dtype and got.shape == (rows, out)
        torch.testing.assert_close(got, linear.forward_torch(x, bias), **TOL[dtype])
        if dtype == torch.float32:
            want = x.double() @ w_t + bias.double()
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_fused_parts_write_their_own_columns_of_one_output(ops):
    """q/k/v as three parts (in one row order) of widths 48, 16, 16; x strided; an empty step."""
    parts = [drawn_weight(seed, out, 48) for seed, out in ((1, 48), (2, 16), (3, 16))]
    linear = PackedLinear([part for part, _ in parts])
    linear.cpu_kernel = ops
    x = torch.randn(IN, 6, generator=torch.Generator().manual_seed(4)).t()  # columns not contiguous
    want = torch.cat([x.double() @ w_t for _, w_t in parts], dim=1)
    torch.testing.assert_close(linear(x, None).double(), want, rtol=1e-5, atol=1e-5)
    assert linear(x[:0], None).shape == (0, 80)


def test_rows_in_unequal_runs_keep_the_twin():
    """A row-parallel slice of an act-order checkpoint: rows reach their groups unevenly (g_idx)."""
    gen = torch.Generator().manual_seed(5)
    g_idx = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    part = PackedWeight(
        4, torch.randint(0, 16, (8, 16), generator=gen), torch.zeros(3, 16), torch.ones(3, 16), g_idx
    )
    assert part.run == 0 and not PackedLinear([part]).can_use_cpu_kernel


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_gguf_4bit_blocks_multiply_as_the_gguf_package_dequantizes(ops, qtype):
    from gguf import GGMLQuantizationType, quants

    from loraxpy.worker.gguf_weights import GgufLinear

    kind = GGMLQuantizationType[qtype]
    w = np.random.default_rng(6).standard_normal((40, 96)).astype(np.float32)
    raw = quants.quantize(w, kind)
    linear = GgufLinear([(int(kind), torch.from_numpy(raw))], 96)
    assert linear.can_use_cpu_kernel
    linear.cpu_kernel = ops
    full = torch.from_numpy(quants.dequantize(raw, kind)).double()
    assert torch.equal(linear.dequantize().double(), full)
    for rows in ROWS:
        x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
        torch.testing.assert_close(linear(x, None).double(), x.double() @ full.t(), rtol=1e-5, atol=1e-5)
