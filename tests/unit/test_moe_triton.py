"""The Triton grouped expert kernels against their torch twin (`Experts.forward_torch`) and a dense
per-expert reference, run by Triton's interpreter on CPU in fp32 (the interpreter multiplies bf16
wrongly; tests/gpu compiles fp32/fp16/bf16 on a GPU).

Routings are built by hand so the cases that break grouping show up: experts with no rows, an
expert whose rows fill more than one row block, one token, and widths that end inside a tile.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from loraxpy.worker.layers import Shard
from loraxpy.worker.model_config import MoeConfig
from loraxpy.worker.moe import Experts

triton = pytest.importorskip("triton", reason="triton is a dev dependency (make install)")

# hidden and expert sizes end inside a BLOCK_K / BLOCK_N tile; the gate/up halves are 40 apart
HIDDEN, EXPERT_SIZE, NUM_EXPERTS, TOP_K = 48, 40, 5, 2
FP32_TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def moe_triton():
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets it"
    from loraxpy.kernels import moe_triton

    assert moe_triton.available()
    return moe_triton


def _experts() -> Experts:
    moe = MoeConfig(num_experts=NUM_EXPERTS, top_k=TOP_K, expert_size=EXPERT_SIZE, renormalize=True)
    experts = Experts(moe, HIDDEN, Shard(0, 1), torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    experts.gate_up.data.normal_(generator=gen).mul_(0.2)
    experts.down.data.normal_(generator=gen).mul_(0.2)
    return experts


def _routing(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights fp32, ids) [tokens, TOP_K]: each token's two distinct experts, by `kind`."""
    gen = torch.Generator().manual_seed(len(kind))
    if kind == "one-token":
        ids = torch.tensor([[4, 1]])
    elif kind == "uneven":  # expert 0 takes 19 rows (two row blocks of 16), expert 2 none
        second = torch.tensor([1, 3, 4, 1, 3, 4, 1, 3, 4, 1, 3, 4, 1, 3, 4, 1, 3, 4, 1, 4, 3])
        ids = torch.stack([torch.tensor([0] * 19 + [1, 3]), second], dim=1)
    else:  # "random": two of experts 1..4 each, expert 0 idle
        ids = torch.stack([torch.randperm(4, generator=gen)[:2] + 1 for _ in range(11)])
    weights = torch.rand(ids.shape, generator=gen)
    return weights / weights.sum(dim=1, keepdim=True), ids


def _dense(experts: Experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, act) -> torch.Tensor:
    """Every routed (token, k) row through its expert one at a time, in float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate, up = (experts.gate_up[e].double() @ x[t].double()).chunk(2)
            out[t] += float(weights[t, k]) * (experts.down[e].double() @ (act(gate) * up))
    return out


@pytest.mark.parametrize("kind", ["uneven", "random", "one-token"])
def test_grouped_experts_equal_the_torch_twin(moe_triton, kind: str) -> None:
    experts = _experts()
    weights, ids = _routing(kind)
    x = torch.randn(ids.shape[0], HIDDEN, generator=torch.Generator().manual_seed(3))
    if kind == "random":  # a transposed view: the kernels read rows with unit column stride
        x = x.t().contiguous().t()
    got = moe_triton.grouped_experts(x, experts.gate_up, experts.down, weights, ids, "silu")
    torch.testing.assert_close(got, experts.forward_torch(x, weights, ids), **FP32_TOL)
    torch.testing.assert_close(got.double(), _dense(experts, x, weights, ids, F.silu), **FP32_TOL)


def test_gelu_tanh_experts_equal_the_dense_reference(moe_triton) -> None:
    experts = _experts()
    weights, ids = _routing("uneven")
    x = torch.randn(ids.shape[0], HIDDEN, generator=torch.Generator().manual_seed(4))
    got = moe_triton.grouped_experts(x, experts.gate_up, experts.down, weights, ids, "gelu_tanh")
    want = _dense(experts, x, weights, ids, lambda g: F.gelu(g, approximate="tanh"))
    torch.testing.assert_close(got.double(), want, **FP32_TOL)


def test_row_blocks_stay_within_one_expert(moe_triton) -> None:
    """Blocks follow the sorted rows expert by expert; the padding entries name no expert."""
    ids = torch.tensor([[0, 2], [0, 2], [0, 3], [2, 0], [0, 3]])  # counts 5, 0, 3, 2
    blocks = moe_triton.RowBlocks.build(ids, 4, block_m=2)
    assert torch.equal(ids.flatten()[blocks.order], torch.tensor([0] * 5 + [2] * 3 + [3] * 2))
    assert torch.equal(blocks.tokens, blocks.order // 2)
    expert, first, end = blocks.data.T.tolist()
    used = [i for i, e in enumerate(expert) if e >= 0]
    # expert 0: rows 0-4 in blocks of 2; expert 2: rows 5-7; expert 3: rows 8-9
    assert [(expert[i], first[i], end[i]) for i in used] == [
        (0, 0, 5), (0, 2, 5), (0, 4, 5), (2, 5, 8), (2, 7, 8), (3, 8, 10),
    ]  # fmt: skip
    assert all(e == -1 for e in expert[len(used) :])
    assert blocks.max_blocks >= len(used)


def test_experts_on_cpu_take_the_torch_path() -> None:
    assert not _experts().use_triton
