"""Mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): a router picks each token's top-k experts
and only those tokens run through each expert.

Tensor parallelism as the dense MLP: every shard holds a slice of every expert's intermediate
dimension (gate/up rows, down columns) and of the shared expert, the router is replicated, and the
layer's partial sums meet in one all-reduce. Expert weights take no LoRA (adapters that target them
are refused when read: worker/adapters.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraxpy.kernels import moe_triton
from loraxpy.worker.layers import ColumnParallelLinear, RowParallelLinear, Shard, all_reduce
from loraxpy.worker.model_config import ModelConfig, MoeConfig

# Mixtral's checkpoint names of an expert's projections.
MIXTRAL_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, expert ids) [num_tokens, top_k]: the top-k of softmax(logits) in fp32, renormalised
    to sum to 1 when asked (as HF's routers)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class Experts(nn.Module):
    """num_experts gated MLPs stored as stacked tensors: gate_up [E, 2 * local, hidden], down
    [E, hidden, local], where local is this shard's part of each expert's intermediate size."""

    def __init__(
        self, moe: MoeConfig, hidden_size: int, shard: Shard, dtype: torch.dtype, device: torch.device
    ):
        super().__init__()
        self.shard = shard
        self.num_experts = moe.num_experts
        # On CUDA with Triton: the grouped kernels (kernels/moe_triton.py); the startup self-check
        # turns this off if they disagree with the torch path below.
        self.use_triton = device.type == "cuda" and moe_triton.available()
        self.local = shard.split(moe.expert_size, "moe_intermediate_size of the experts")
        self.gate_up = nn.Parameter(
            torch.empty(moe.num_experts, 2 * self.local, hidden_size, dtype=dtype, device=device),
            requires_grad=False,
        )
        self.down = nn.Parameter(
            torch.empty(moe.num_experts, hidden_size, self.local, dtype=dtype, device=device),
            requires_grad=False,
        )
        # The checkpoint tensors this module takes, by slice name (what the loader checks off).
        self.local_sizes = {
            f"{e}.{proj}": self.local
            for e in range(moe.num_experts)
            for proj in ("gate_proj", "up_proj", "down_proj")
        }

    def load(self, slice_name: str, param: str, tensor: torch.Tensor) -> None:
        """Copies this rank's part of expert `e`'s projection, slice_name "e.gate_proj" etc."""
        if slice_name not in self.local_sizes or param != "weight":
            raise ValueError(f"experts have no {slice_name}.{param}")
        expert, proj = slice_name.split(".")
        e, start = int(expert), self.shard.rank * self.local
        if proj == "down_proj":
            src, dst = tensor.narrow(1, start, self.local), self.down.data[e]
        else:
            offset = 0 if proj == "gate_proj" else self.local
            src, dst = tensor.narrow(0, start, self.local), self.gate_up.data[e, offset : offset + self.local]
        if src.shape != dst.shape:
            raise ValueError(f"expert {slice_name}: checkpoint shape {tuple(tensor.shape)} does not fit")
        dst.copy_(src)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """sum over k of weights[t, k] * expert_{ids[t, k]}(x[t]), this shard's partial sum.

        On CUDA with Triton, two grouped launches over all experts (`moe_triton.grouped_experts`,
        no host sync); elsewhere `forward_torch`.
        """
        if self.use_triton and x.is_cuda:
            return moe_triton.grouped_experts(x, self.gate_up, self.down, weights, ids, "silu")
        return self.forward_torch(x, weights, ids)

    def forward_torch(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The torch path (CPU, and the Triton kernels' twin).

        Tokens are grouped by expert (one sort), each expert runs once over its rows, and the rows
        are added back with one index_add: no expert sees a token it was not routed. There is no
        Python loop over tokens; the loop is over experts (num_experts matmul pairs, empty experts
        skipped), which on CPU costs what a grouped GEMM would. The per-expert counts are read on the
        host, so this path stays out of CUDA graphs.
        """
        # x: [num_tokens, hidden]; weights, ids: [num_tokens, top_k] -> [num_tokens, hidden]
        if x.shape[0] == 0:
            return torch.zeros_like(x)
        top_k = ids.shape[1]
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        tokens = order // top_k  # the token of each routed row, grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        rows = x.index_select(0, tokens)
        outputs = []
        for e, part in enumerate(rows.split(counts)):
            if part.shape[0]:
                gate, up = F.linear(part, self.gate_up[e]).chunk(2, dim=-1)
                outputs.append(F.linear(F.silu(gate) * up, self.down[e]))
        out = torch.cat(outputs) * weights.flatten()[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, out)


def experts_reference(
    experts: Experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """The slow twin of `Experts.forward`: every expert over every token, weighted densely."""
    dense = torch.zeros(x.shape[0], experts.num_experts, dtype=torch.float32, device=x.device)
    dense.scatter_(1, ids, weights.float())
    out = torch.zeros_like(x)
    for e in range(experts.num_experts):
        gate, up = F.linear(x, experts.gate_up[e]).chunk(2, dim=-1)
        out += F.linear(F.silu(gate) * up, experts.down[e]) * dense[:, e : e + 1].to(x.dtype)
    return out


class ReplicatedLinear(nn.Module):
    """y = x W^T with the whole W on every shard (routers and gates: a few rows)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False
        )

    def load(self, slice_name: str, param: str, tensor: torch.Tensor) -> None:
        if param != "weight" or tensor.shape != self.weight.shape:
            raise ValueError(
                f"{slice_name}.{param}: checkpoint shape {tuple(tensor.shape)} != {tuple(self.weight.shape)}"
            )
        self.weight.data.copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class SharedExpert(nn.Module):
    """Qwen2-MoE's dense expert, sliced like the dense MLP; returns its partial sum (no all-reduce)."""

    def __init__(self, size: int, hidden_size: int, shard: Shard, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(
            hidden_size,
            {"gate_proj": size, "up_proj": size},
            bias=False,
            shard=shard,
            dtype=dtype,
            device=device,
        )
        self.down_proj = RowParallelLinear(
            size, hidden_size, bias=False, shard=shard, dtype=dtype, device=device
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj.forward_partial(F.silu(gate) * up)


class SparseMoeBlock(nn.Module):
    """The MLP of an MoE layer: router → grouped experts (+ gated shared expert) → one all-reduce."""

    def __init__(self, config: ModelConfig, shard: Shard, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        moe = config.moe
        assert moe is not None
        if config.hidden_act != "silu":
            raise ValueError(f"experts with {config.hidden_act!r} are not supported; only silu")
        self.shard = shard
        self.top_k, self.renormalize = moe.top_k, moe.renormalize
        self.gate = ReplicatedLinear(config.hidden_size, moe.num_experts, dtype, device)
        self.experts = Experts(moe, config.hidden_size, shard, dtype, device)
        self.shared_expert: SharedExpert | None = None
        self.shared_expert_gate: ReplicatedLinear | None = None
        if moe.shared_expert_size:
            self.shared_expert = SharedExpert(
                moe.shared_expert_size, config.hidden_size, shard, dtype, device
            )
            self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, hidden] (every shard the same) -> [num_tokens, hidden]
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            # sigmoid(g) scales each shard's partial sum alike, so one all-reduce covers both.
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return all_reduce(out, self.shard)
