"""The Triton w4a16 matmul (kernels/w4a16_triton.py) against its torch twin (`PackedLinear.forward_torch`:
dequantize, then matmul) and a float64 product of the integers, zeros and scales the test drew
before packing them, run by Triton's interpreter on CPU (fp32; tests/gpu compiles fp16 and bf16).

Checkpoint tensors are packed by compressed-tensors' `pack_to_int32` in each format's documented
layout (GPTQ: eight input rows a word, zero points minus 1 in v1; AWQ: eight output columns a word
in the order 0, 2, 4, 6, 1, 3, 5, 7), then read by the worker's own loader code, so the kernel sees
exactly what a served checkpoint gives it: act-order rows (x permuted, groups sorted into runs), a
row-parallel shard's slice of an act-order checkpoint (unequal runs: each row's group gathered),
one group over all rows, 8-bit values (one a byte), and widths that end inside a tile.
"""

from __future__ import annotations

import os

import pytest
import torch

from loraxpy.worker.gptq import (
    AWQ_ORDER,
    PackedLinear,
    PackedWeight,
    QuantConfig,
    _rows_of_shard,
    _unpacked,
)

triton = pytest.importorskip("triton", reason="triton is a dev dependency (make install)")

IN, OUT = 96, 80  # 80 output columns end inside the second 64-column tile
ROWS = (3, 37)  # a decode-sized step (16-row blocks) and a prefill-sized one (64-row blocks)


@pytest.fixture(scope="module")
def w4a16():
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets it"
    from loraxpy.kernels import w4a16_triton

    assert w4a16_triton.available()
    return w4a16_triton


def _pack(unsigned: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32((unsigned - (1 << (bits - 1))).to(torch.int8), bits, packed_dim=dim)


def _awq_columns(t: torch.Tensor) -> torch.Tensor:
    """Columns reordered so that value i of each word holds column AWQ_ORDER[i] of its eight."""
    index = torch.arange(t.shape[1]).view(-1, 8)[:, list(AWQ_ORDER)].reshape(-1)
    return t[:, index]


def _checkpoint(method: str, bits: int, group_size: int, desc_act: bool, seed: int, out: int = OUT):
    """(config, packed checkpoint tensors, the drawn (q [in, out], zeros, scales [groups, out], g_idx))."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else -(-IN // group_size)
    size = IN if group_size == -1 else group_size
    g_idx = (torch.arange(IN) // size).to(torch.int32)
    if desc_act:  # act-order: row perm[j] in group j // size
        perm = torch.randperm(IN, generator=gen)
        g_idx = torch.empty_like(g_idx)
        g_idx[perm] = (torch.arange(IN) // size).to(torch.int32)
    top = (1 << bits) - 1
    q = torch.randint(0, top + 1, (IN, out), generator=gen, dtype=torch.int32)
    zeros = torch.randint(1, top + 1, (groups, out), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, out, generator=gen) * 0.02 + 0.001).half()
    if method == "gptq":
        tensors = {
            "qweight": _pack(q, bits, 0),
            "qzeros": _pack(zeros - 1, bits, 1),  # checkpoint_format gptq (v1): stored minus 1
            "scales": scales,
            "g_idx": g_idx,
        }
        q_config = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act}
    else:
        tensors = {
            "qweight": _pack(_awq_columns(q), bits, 1),
            "qzeros": _pack(_awq_columns(zeros), bits, 1),
            "scales": scales,
        }
        q_config = {"quant_method": "awq", "bits": bits, "group_size": group_size}
    return QuantConfig.from_checkpoint(q_config), tensors, (q, zeros, scales.float(), g_idx.long())


def _part(config: QuantConfig, tensors, rows: slice | None = None) -> PackedWeight:
    """The worker's loader: unpack, take a row-parallel shard's rows, keep them as PackedWeight."""
    t = _unpacked(config, tensors, "layer")
    if rows is not None:
        t = _rows_of_shard(config, t, rows.start, rows.stop - rows.start, "layer")
    return PackedWeight(config.bits, t["ints"], t["zeros"], t["scales"], t["g_idx"])


def _dense(x: torch.Tensor, drawn, rows: slice = slice(0, IN)) -> torch.Tensor:
    """x @ W^T in float64, W^T[i, o] = (q[i, o] - z[g(i), o]) * s[g(i), o] over the input rows `rows`."""
    q, zeros, scales, g_idx = drawn
    g = g_idx[rows]
    w_t = (q[rows] - zeros[g]).double() * scales[g].double()
    return x.double() @ w_t


CASES = {
    "gptq g32": ("gptq", 4, 32, False),
    "gptq act-order g32": ("gptq", 4, 32, True),
    "gptq one group": ("gptq", 4, -1, False),
    "gptq 8-bit act-order g16": ("gptq", 8, 16, True),
    "awq g32": ("awq", 4, 32, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_w4a16_matmul_equals_the_dequantizing_twin(w4a16, case: str) -> None:
    config, tensors, drawn = _checkpoint(*CASES[case], seed=len(case))
    linear = PackedLinear([_part(config, tensors)])
    assert linear.weights[0].packed == (config.bits == 4) and linear.weights[0].run  # rows in runs
    for rows in ROWS:
        x = torch.randn(rows, IN, generator=torch.Generator().manual_seed(rows))
        bias = torch.randn(OUT)
        got = linear.forward_triton(x, bias)
        torch.testing.assert_close(got, linear.forward_torch(x, bias), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.double(), _dense(x, drawn) + bias.double(), rtol=1e-5, atol=1e-5)


def test_a_row_parallel_slice_of_an_act_order_checkpoint_gathers_each_rows_group(w4a16) -> None:
    """Rows 0..47 of an act-order checkpoint use every group, unevenly: the kernel reads g_idx."""
    config, tensors, drawn = _checkpoint("gptq", 4, 32, True, seed=5)
    part = _part(config, tensors, slice(0, IN // 2))
    assert part.run == 0 and part.perm is not None
    linear = PackedLinear([part])
    x = torch.randn(37, IN // 2, generator=torch.Generator().manual_seed(1))
    got = linear.forward_triton(x, None)
    torch.testing.assert_close(got, linear.forward_torch(x, None), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), _dense(x, drawn, slice(0, IN // 2)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("desc_act", [False, True])
def test_fused_parts_write_their_own_columns(w4a16, desc_act: bool) -> None:
    """q/k/v as three parts (one order of x, shared or each its own) into one output, widths 80, 16, 16."""
    cases = [_checkpoint("gptq", 4, 32, desc_act, seed=s, out=o) for s, o in ((1, 80), (2, 16), (3, 16))]
    linear = PackedLinear([_part(config, tensors) for config, tensors, _ in cases])
    assert linear.shared_order == (not desc_act)
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(2))
    got = linear.forward_triton(x, None)
    torch.testing.assert_close(got, linear.forward_torch(x, None), rtol=1e-5, atol=1e-5)
    want = torch.cat([_dense(x, drawn) for _, _, drawn in cases], dim=1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_a_strided_input_and_an_empty_step(w4a16) -> None:
    config, tensors, drawn = _checkpoint("awq", 4, 32, False, seed=9)
    linear = PackedLinear([_part(config, tensors)])
    x = torch.randn(IN, 7, generator=torch.Generator().manual_seed(3)).t()  # columns not contiguous
    torch.testing.assert_close(
        linear.forward_triton(x, None).double(), _dense(x, drawn), rtol=1e-5, atol=1e-5
    )
    assert linear.forward_triton(x[:0], None).shape == (0, OUT)


def test_packed_linears_on_cpu_take_the_torch_path() -> None:
    config, tensors, _ = _checkpoint("gptq", 4, 32, False, seed=1)
    assert not PackedLinear([_part(config, tensors)]).use_triton
