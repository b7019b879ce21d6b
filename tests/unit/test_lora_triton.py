"""The Triton SGMV kernels against their torch twins, run by Triton's interpreter on CPU.

On CUDA the same comparison runs compiled (bf16 included) in the GPU checks; here the interpreter
executes the kernels' own code (tiles, masks, segment bounds, per-slot ranks) on CPU tensors.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from test_lora_kernels import IN, MAX_RANK, OUT, distribution, slot_tensors

from loraxpy.kernels import lora

triton = pytest.importorskip("triton", reason="triton is a dev dependency (make install)")

KINDS = ["all-distinct", "uniform", "skewed", "identical", "base-only", "interleaved"]
RANKS = [0, 4, 8, 16, 1, 16, 2, 12, 8]


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
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(v.float(), v_twin, **tol)

    # expand adds into a column slice of a wider output, as for the fused q/k/v layer
    offset, width = 8, OUT + 24
    y = torch.randn(num_rows, width, generator=torch.Generator().manual_seed(2)).to(dtype)
    expected = y.float().clone()
    expected[:, offset : offset + OUT] += lora.lora_expand(v.float(), b.float(), index)
    sgmv.sgmv_expand_add(v, b, segments, y, offset)
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


def test_a_fused_qkv_layer_gives_the_same_output_on_both_paths(sgmv) -> None:
    """The worker's LoraSlots with the Triton backend (interpreted here) against its torch path."""
    from loraxpy.worker.layers import ColumnParallelLinear, Shard
    from loraxpy.worker.lora import LoraBatch, LoraSlots

    torch.manual_seed(0)
    hidden, q, kv, max_rank = 32, 32, 16, 16
    layer = ColumnParallelLinear(
        hidden, {"q_proj": q, "k_proj": kv, "v_proj": kv}, bias=False, shard=Shard(),
        dtype=torch.float32, device=torch.device("cpu"),
    )  # fmt: skip
    layer.weight.data.normal_()
    batch = LoraBatch()
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv)}
    layer.lora = LoraSlots(layer, shapes, batch, num_slots=4, max_rank=max_rank, shard=Shard())
    ranks = {1: 4, 2: 16, 3: 8}
    for slot, r in ranks.items():
        for name, (i, o) in shapes.items():
            if (slot, name) != (3, "k_proj"):  # slot 3 leaves k alone
                layer.lora.write(slot, name, torch.randn(r, i), torch.randn(o, r))
    slots = [0, 0, 2, 2, 2, 1, 3, 3, 0, 1]
    x = torch.randn(len(slots), hidden)
    batch.token_slots = torch.tensor(slots)
    expected = layer(x)
    batch.segments = sgmv.Segments.build(slots, ranks, x.device)
    got = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    batch.token_slots, batch.segments = None, None
    assert not torch.allclose(layer(x), expected)  # the adapters did change the output
