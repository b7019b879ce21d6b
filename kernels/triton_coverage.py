"""The Triton launches a model's forward pass makes, built from meta tensors by the kernels' own launchers.

For each model shape and dtype: paged attention for a decode step and for a step with prompt rows
(their tiles differ), the KV store, SGMV shrink/expand for every adapted layer (fused q/k/v, o,
fused gate/up, down) at each slot rank, and for MoE models the grouped expert GEMMs (gate/up and
down) of a decode step, a short and a long prefill step (their row blocks differ), and the w4a16
matmul of GPTQ / AWQ checkpoints' decoder linears in a decode and a prefill step. Tensors are
shaped as the worker lays them out on one shard (worker/model.py, worker/lora.py) but live on the
meta device, so an 8B layer costs nothing; `attention_launch`, `store_launch`, `shrink_launch` and
`expand_launch` decide every block size and constexpr exactly as at run time (`gate_up_launch`,
`down_launch` and `w4a16_launch` too). `main` writes docs/triton-kernels.md.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraxpy.kernels.attention import AttentionMetadata
from loraxpy.kernels.attention_triton import attention_launch, store_launch
from loraxpy.kernels.lora_triton import Segments, SliceLayout, expand_launch, shrink_launch
from loraxpy.kernels.moe_triton import RowBlocks, block_m, down_launch, gate_up_launch, max_blocks
from loraxpy.kernels.triton_aot import (
    TARGETS,
    Job,
    Planned,
    Report,
    compile_jobs,
    default_workers,
    plan,
    problems,
)
from loraxpy.kernels.triton_launch import Launch
from loraxpy.kernels.w4a16_triton import w4a16_launch

META = torch.device("meta")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The worker's default --block-size, and the slot ranks of lorax-bench (16) and --max-lora-rank (64).
BLOCK_SIZE = 16
MAX_RANKS = (16, 64)
# A step's rows: 4 sequences of 40 cached tokens; decode computes one token each, prefill a mix.
SEQ_LENS = [40, 40, 40, 40]
QUERY_LENS = {"decode": [1, 1, 1, 1], "prefill": [40, 1, 8, 1]}
SLOTS = [1, 1, 0, 2, 2, 2, 3, 0, 1]  # adapter slot of each row: runs of adapters and base rows
NUM_SLOTS = 4
# Tokens of an MoE step: decode (4 sequences), the prefill step above, and a long prompt chunk.
MOE_STEPS = {"decode": 4, "prefill": 50, "prefill 512": 512}
GPTQ_GROUP = 128  # rows per quantization group of the GPTQ / AWQ launches (the formats' usual size)


@dataclass(frozen=True)
class ModelDims:
    """What the kernels' specialisations depend on in a Llama-family model (one shard)."""

    name: str
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    sliding_window: int | None = None
    num_experts: int = 0  # MoE models (worker/moe.py): experts, top-k and each expert's size
    top_k: int = 0
    expert_size: int = 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


# The default model (SmolLM2-135M-Instruct): its heads are the only odd GQA group (3) served.
DEFAULT_MODEL = ModelDims("smollm2-135m", 576, 9, 3, 64, 1536)


@dataclass(frozen=True)
class Use:
    """Where a launch comes from: model, dtype and what it computes there."""

    model: str
    dtype: str
    what: str

    def __str__(self) -> str:
        return f"{self.model} {self.dtype} {self.what}"


def model_launches(dims: ModelDims, dtype: torch.dtype) -> list[tuple[Use, Launch]]:
    """Every distinct-purpose launch of one forward pass of `dims` in `dtype`."""
    name = str(dtype).removeprefix("torch.")
    found = [(Use(dims.name, name, what), launch) for what, launch in attention_launches(dims, dtype)]
    found += [(Use(dims.name, name, what), launch) for what, launch in lora_launches(dims, dtype)]
    found += [(Use(dims.name, name, what), launch) for what, launch in moe_launches(dims, dtype)]
    found += [(Use(dims.name, name, what), launch) for what, launch in packed_launches(dims, dtype)]
    return found


def attention_launches(dims: ModelDims, dtype: torch.dtype) -> list[tuple[str, Launch]]:
    num_tokens = sum(QUERY_LENS["prefill"])
    # As worker/model.py lays them out: q and k are views of one rotary output, v a view of qkv.
    qkv = torch.empty(num_tokens, dims.q_size + 2 * dims.kv_size, dtype=dtype, device=META)
    qk = torch.empty(num_tokens, dims.num_heads + dims.num_kv_heads, dims.head_dim, dtype=dtype, device=META)
    query, key = qk.split([dims.num_heads, dims.num_kv_heads], dim=1)
    value = qkv[:, dims.q_size + dims.kv_size :].view(-1, dims.num_kv_heads, dims.head_dim)
    num_blocks = len(SEQ_LENS) * -(-max(SEQ_LENS) // BLOCK_SIZE)
    cache = torch.empty(num_blocks, BLOCK_SIZE, dims.num_kv_heads, dims.head_dim, dtype=dtype, device=META)
    slots = torch.empty(num_tokens, dtype=torch.int64, device=META)
    found = [("kv store", store_launch(key, value, cache, cache, slots))]
    per_seq = num_blocks // len(SEQ_LENS)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(SEQ_LENS))]
    for step, query_lens in QUERY_LENS.items():
        meta = AttentionMetadata.build(query_lens, SEQ_LENS, tables, META)
        q = query[: sum(query_lens)]
        out = torch.empty_like(q)
        launch = attention_launch(q, cache, cache, out, meta, dims.head_dim**-0.5, dims.sliding_window)
        found.append((f"attention {step}", launch))
    return found


def lora_layers(dims: ModelDims) -> dict[str, tuple[int, list[int]]]:
    """Adapted layer → (input features, output size of each fused slice), as worker/lora.py stacks them."""
    return {
        "qkv": (dims.hidden, [dims.q_size, dims.kv_size, dims.kv_size]),
        "o": (dims.q_size, [dims.hidden]),
        "gate_up": (dims.hidden, [dims.intermediate, dims.intermediate]),
        "down": (dims.intermediate, [dims.hidden]),
    }


def lora_launches(dims: ModelDims, dtype: torch.dtype) -> list[tuple[str, Launch]]:
    rows = len(SLOTS)
    segments = Segments.build(SLOTS, dict.fromkeys(range(1, NUM_SLOTS), 8), META)
    found = []
    for layer, (in_features, out_sizes) in lora_layers(dims).items():
        offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes))]
        layout = SliceLayout.build(out_sizes, offsets, META)
        x = torch.empty(rows, in_features, dtype=dtype, device=META)
        y = torch.empty(rows, sum(out_sizes), dtype=dtype, device=META)
        for rank in MAX_RANKS:
            a = torch.empty(NUM_SLOTS, len(out_sizes) * rank, in_features, dtype=dtype, device=META)
            b = torch.empty(NUM_SLOTS, sum(out_sizes), rank, dtype=dtype, device=META)
            v = torch.empty(rows, a.shape[1], dtype=dtype, device=META)
            found.append((f"{layer} shrink r{rank}", shrink_launch(x, a, v, segments, len(out_sizes))))
            found.append((f"{layer} expand r{rank}", expand_launch(v, b, segments, y, layout)))
    return found


def moe_launches(dims: ModelDims, dtype: torch.dtype) -> list[tuple[str, Launch]]:
    """The grouped expert GEMMs of one shard's experts, as worker/moe.py stores them."""
    if not dims.num_experts:
        return []
    gate_up = torch.empty(dims.num_experts, 2 * dims.expert_size, dims.hidden, dtype=dtype, device=META)
    down = torch.empty(dims.num_experts, dims.hidden, dims.expert_size, dtype=dtype, device=META)
    found = []
    for step, num_tokens in MOE_STEPS.items():
        rows = num_tokens * dims.top_k
        # as RowBlocks.build lays them out (it needs real ids; only the shapes matter here)
        rows_per_block = block_m(rows, dims.num_experts, dtype)
        blocks = RowBlocks(
            order=torch.empty(rows, dtype=torch.int64, device=META),
            tokens=torch.empty(rows, dtype=torch.int64, device=META),
            data=torch.empty(
                max_blocks(rows, dims.num_experts, rows_per_block), 3, dtype=torch.int32, device=META
            ),
            block_m=rows_per_block,
        )
        x = torch.empty(num_tokens, dims.hidden, dtype=dtype, device=META)
        h = torch.empty(rows, dims.expert_size, dtype=dtype, device=META)
        y = torch.empty(rows, dims.hidden, dtype=dtype, device=META)
        weights = torch.empty(num_tokens, dims.top_k, dtype=torch.float32, device=META)
        found.append((f"experts gate_up {step}", gate_up_launch(x, gate_up, h, blocks, "silu")))
        found.append((f"experts down {step}", down_launch(h, down, y, blocks, weights)))
    return found


def packed_launches(dims: ModelDims, dtype: torch.dtype) -> list[tuple[str, Launch]]:
    """A GPTQ / AWQ checkpoint's decoder linears (4-bit, groups of GPTQ_GROUP rows) in a decode and a
    prefill step, each part of a fused layer its own launch as worker/gptq.py makes them; the
    row-parallel ones (o, down) also as a shard's slice of an act-order checkpoint, whose rows' groups
    are gathered. MoE models' experts are not read packed: only their attention linears."""
    layers = lora_layers(dims)
    if dims.num_experts:
        layers = {k: v for k, v in layers.items() if k in ("qkv", "o")}
    found = []
    for step, query_lens in QUERY_LENS.items():
        rows = sum(query_lens)
        for layer, (in_features, out_sizes) in layers.items():
            x = torch.empty(rows, in_features, dtype=dtype, device=META)
            groups = -(-in_features // GPTQ_GROUP)
            row_parallel = layer in ("o", "down")
            for out_features in dict.fromkeys(out_sizes):  # q, k, v / gate, up: equal sizes launch alike
                values = torch.empty(in_features // 2, out_features, dtype=torch.uint8, device=META)
                scales = torch.empty(groups, out_features, dtype=torch.float32, device=META)
                y = torch.empty(rows, out_features, dtype=dtype, device=META)
                launch = w4a16_launch(x, values, scales, scales, None, GPTQ_GROUP, True, y)
                found.append((f"gptq {layer} {step}", launch))
                if row_parallel:
                    g_idx = torch.empty(in_features, dtype=torch.int64, device=META)
                    launch = w4a16_launch(x, values, scales, scales, g_idx, 0, True, y)
                    found.append((f"gptq act-order {layer} shard {step}", launch))
    return found


def _moe_dims(extra: dict[str, Any], intermediate: int) -> dict[str, int]:
    """ModelDims' MoE fields from a bench shape's HF config extras (Mixtral's or Qwen's names)."""
    num_experts = extra.get("num_local_experts") or extra.get("num_experts")
    if not num_experts:
        return {}
    size = extra.get("moe_intermediate_size", intermediate)
    return {"num_experts": num_experts, "top_k": extra["num_experts_per_tok"], "expert_size": size}


def coverage_models() -> list[ModelDims]:
    """lorax-bench's model shapes (the ones the GPU benchmark measures) and the default model."""
    from loraxpy.bench.shapes import SHAPES  # imported here: kernels/ needs bench only for this list

    shapes = [
        ModelDims(
            s.name,
            s.hidden_size,
            s.num_heads,
            s.num_kv_heads,
            s.head_dim,
            s.intermediate_size,
            **_moe_dims(s.extra, s.intermediate_size),
        )
        for s in SHAPES.values()
    ]
    return [*shapes, DEFAULT_MODEL]


def all_launches(models: list[ModelDims]) -> list[tuple[Use, Launch]]:
    return [pair for dims in models for dtype in DTYPES for pair in model_launches(dims, dtype)]


TABLE_HEADER = "| kernel | target | dtype | constexprs | warps · stages | registers | spill bytes | shared bytes | launched by |"


def table_rows(planned: list[Planned], reports: list[Report]) -> list[str]:
    """One markdown row per compiled kernel, ordered by kernel, target, dtype and constexprs."""
    rows = []
    for p, r in sorted(zip(planned, reports, strict=True), key=lambda pr: _order(pr[0].job)):
        job = p.job
        constexprs = ", ".join(f"{k}={v}" for k, v in job.constexprs)
        resources = f"{r.num_warps} · {r.num_stages} | {r.n_regs} | {r.spill_bytes} | {r.shared}"
        if r.error:
            resources = f"- | - | - | - (does not compile: {r.error})"
        rows.append(
            f"| {job.kernel} | sm_{job.arch} | {job.dtype} | {constexprs} | {resources} | {_uses(p)} |"
        )
    return rows


def _order(job: Job) -> tuple[Any, ...]:
    """A specialisation's sm_80 and sm_90 rows side by side, constexprs in numeric order."""
    return (job.kernel, job.dtype, job.constexprs, job.options, job.arch)


def _uses(planned: Planned) -> str:
    """'qkv shrink r16, o shrink r16: 1b, 8b' — what each launch computes, and in which models."""
    models: dict[str, list[str]] = {}
    for use in planned.uses:
        assert isinstance(use, Use)
        names = models.setdefault(use.what, [])
        if use.model not in names:
            names.append(use.model)
    by_models: dict[tuple[str, ...], list[str]] = {}
    for what, names in models.items():
        by_models.setdefault(tuple(names), []).append(what)
    return "; ".join(f"{', '.join(whats)}: {', '.join(names)}" for names, whats in by_models.items())


def render_table(planned: list[Planned], reports: list[Report], triton_version: str) -> str:
    limits = "; ".join(
        f"{t.name}: {t.max_shared} bytes of shared memory per block, {t.max_regs_per_thread} registers per thread"
        for t in TARGETS.values()
    )
    lines = [
        "# Triton kernels compiled ahead of time",
        "",
        "Every Triton kernel as the launchers specialise it for lorax-bench's model shapes and the",
        "default model, in fp32, fp16 and bf16, compiled without a GPU for each target (Triton",
        f"{triton_version}). `make test` compiles the same kernels (tests/unit/test_triton_aot.py,",
        "marker `aot`) and fails on any spill or shared memory past the target's limit; regenerate",
        "this page with `python -m loraxpy.kernels.triton_coverage --write docs/triton-kernels.md`.",
        "",
        "Kernels: `store_kernel`, `attention_kernel` (kernels/attention_triton.py: paged KV store and",
        "attention); `shrink_kernel`, `expand_kernel` (kernels/lora_triton.py: SGMV LoRA);",
        "`gate_up_kernel`, `down_kernel` (kernels/moe_triton.py: grouped expert GEMMs of MoE layers,",
        "gate/up with the activation fused, down weighted by the routing weights); `w4a16_kernel`",
        "(kernels/w4a16_triton.py: GPTQ / AWQ linears multiplied from their 4-bit integers, groups of",
        f"{GPTQ_GROUP} rows in runs or gathered per row for an act-order shard).",
        "",
        f"Limits: {limits}. Registers and spill bytes are read from each cubin (cuobjdump): on a GPU",
        "the compiled kernel's `n_regs` should equal the registers here and `n_spills` the spill",
        "bytes / 4; shared bytes are the kernel's `metadata.shared`.",
        "",
        TABLE_HEADER,
        "|---|---|---|---|---|---|---|---|---|",
        *table_rows(planned, reports),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    import triton

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", type=Path, help="the markdown page to write (default: print it)")
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args(argv)
    planned = plan(all_launches(coverage_models()))
    reports = compile_jobs([p.job for p in planned], args.workers)
    page = render_table(planned, reports, triton.__version__)
    if args.write:
        args.write.write_text(page)
    else:
        print(page)
    found = [f for p, r in zip(planned, reports, strict=True) for f in problems(p.job, r)]
    for problem in found:
        print(problem, file=sys.stderr)
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
