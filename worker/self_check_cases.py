"""The self-check's small random cases: each returns (fast, twin, dtype), two closures over the same
inputs that return the outputs to compare (`worker/self_check.py` runs and judges them).

Shapes come from the loaded model (its heads, head size, window, fused LoRA layers and dtype), so
the fast path compiles the same specialisations the first real steps would use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from loraxpy.kernels.attention import AttentionBackend, AttentionMetadata
from loraxpy.kernels.lora import LoraPlan, lora_add
from loraxpy.kernels.lora_triton import Segments, sgmv_expand_add, sgmv_shrink
from loraxpy.kernels.moe_triton import grouped_experts
from loraxpy.worker.batch import RequestState, plan_batch
from loraxpy.worker.moe import route
from loraxpy.worker.sampling import SamplingParams

if TYPE_CHECKING:
    from loraxpy.worker.cuda_graphs import DecodeGraphs
    from loraxpy.worker.gptq import PackedLinear
    from loraxpy.worker.lora import LoraSlots
    from loraxpy.worker.model import CausalLM
    from loraxpy.worker.moe import SparseMoeBlock

Outputs = Sequence[torch.Tensor]
Case = tuple[Callable[[], Outputs], Callable[[], Outputs], torch.dtype]

# (query tokens, sequence length) per sequence: a one-token prompt, decodes, a whole prompt and a
# chunk of a longer one, so prefill and decode rows, several blocks and the causal edge are covered.
ATTENTION_SEQS = ((1, 1), (1, 37), (9, 9), (6, 40))
# Each row's adapter slot: base rows, runs of two adapters of different ranks, a run longer than a
# kernel's 16-row tile, and an adapter that comes back after another.
SGMV_ROW_SLOTS = (0, 0, 1, 1, 1, 2, 2, 2, 0, 2, 2, *[1] * 17, 0)
DECODE_SEQ_LENS = (1, 18, 35)  # the sequences of the checked decode step (fewer if the cache is small)
EXPERT_TOKENS = 37  # tokens of the experts' case: uneven rows per expert
PACKED_ROWS = (3, 37)  # rows of x in the GPTQ / AWQ linears' case: a decode-sized and a prefill-sized step


def _generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(1234)


def attention_case(
    model: CausalLM, fast: AttentionBackend, twin: AttentionBackend, block_size: int, window: int | None
) -> Case:
    """Stores a step's K/V and attends over the cache, with each backend, from the same cache."""
    layer = model.layers[0].self_attn  # type: ignore[index]
    weight = model.layers[0].self_attn.o_proj.weight  # type: ignore[index, union-attr]
    device, dtype = weight.device, weight.dtype
    heads, kv_heads, dim = int(layer.num_heads), int(layer.num_kv_heads), int(layer.head_dim)
    g = _generator(device)
    num_tokens = sum(q for q, _ in ATTENTION_SEQS)
    blocks_per_seq = [-(-s // block_size) for _, s in ATTENTION_SEQS]
    # Blocks in shuffled order, so the block-table indirection matters.
    order = torch.randperm(sum(blocks_per_seq), generator=g, device=device).tolist()
    tables, slots, start = [], [], 0
    for (q_len, s_len), n in zip(ATTENTION_SEQS, blocks_per_seq, strict=True):
        table = order[start : start + n]
        start += n
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(s_len - q_len, s_len)]
    meta = AttentionMetadata.build(
        [q for q, _ in ATTENTION_SEQS], [s for _, s in ATTENTION_SEQS], tables, device
    )
    cache_shape = (len(order), block_size, kv_heads, dim)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    query, key, value = (
        randn(num_tokens, heads, dim),
        randn(num_tokens, kv_heads, dim),
        randn(num_tokens, kv_heads, dim),
    )
    k_cache, v_cache = randn(*cache_shape), randn(*cache_shape)
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
    scale = float(layer.scale)

    def run(backend: AttentionBackend) -> Callable[[], Outputs]:
        def go() -> Outputs:
            k, v = k_cache.clone(), v_cache.clone()
            backend.store(key, value, k, v, slot_mapping)
            return backend.attend(query, k, v, meta, scale, window), k, v

        return go

    return run(fast), run(twin), dtype


def sgmv_case(slots: LoraSlots) -> Case:
    """One fused layer's LoRA delta over a mixed batch: Triton SGMV against the grouped torch path.

    Random A and B of the layer's shapes in three slots (0: the base model, 1: the full rank, 2: a
    lower rank zero-padded as the slots are), added onto a random y.
    """
    num_slices = len(slots.slices)
    max_rank = slots.a.shape[1] // num_slices
    device, dtype = slots.a.device, slots.a.dtype
    g = _generator(device)
    in_features, out_total = slots.a.shape[2], slots.b.shape[1]
    ranks = {1: max_rank, 2: max(1, max_rank // 2)}
    a = torch.randn(3, num_slices * max_rank, in_features, generator=g, device=device) / in_features**0.5
    b = torch.randn(3, out_total, max_rank, generator=g, device=device) / max_rank**0.5
    a[0], b[0] = 0, 0
    for i in range(num_slices):
        a[2, i * max_rank + ranks[2] : (i + 1) * max_rank] = 0
    b[2, :, ranks[2] :] = 0
    a, b = a.to(dtype), b.to(dtype)
    weights, b_start = [], 0
    for i, piece in enumerate(slots.slices.values()):
        out_i = piece.b.shape[1]
        weights.append(
            (a[:, i * max_rank : (i + 1) * max_rank], b[:, b_start : b_start + out_i], piece.out_offset)
        )
        b_start += out_i
    y_width = max(offset + w.shape[1] for _, w, offset in weights)
    rows = list(SGMV_ROW_SLOTS)
    x = torch.randn(len(rows), in_features, generator=g, device=device).to(dtype)
    y0 = (0.1 * torch.randn(len(rows), y_width, generator=g, device=device)).to(dtype)

    def fast() -> Outputs:
        segments = Segments.build(rows, ranks, device)
        v = sgmv_shrink(x, a, segments, num_slices)
        y = sgmv_expand_add(v, b, segments, y0.clone(), slots.layout)
        return (y.float() - y0.float(),)  # the delta: y0's rounding would hide a small wrong one

    def twin() -> Outputs:
        plan = LoraPlan.build(rows, ranks, max_rank, device)
        assert plan is not None
        return (lora_add(x, y0.clone(), weights, plan).float() - y0.float(),)

    return fast, twin, dtype


def experts_case(block: SparseMoeBlock) -> Case:
    """An MoE layer's experts (its loaded weights) over random tokens routed by its own router:
    the grouped Triton kernels against the torch path (`Experts.forward_torch`)."""
    experts = block.experts
    device, dtype = experts.gate_up.device, experts.gate_up.dtype
    g = _generator(device)
    x = torch.randn(EXPERT_TOKENS, experts.gate_up.shape[2], generator=g, device=device).to(dtype)
    weights, ids = route(block.gate(x), block.top_k, block.renormalize)

    def fast() -> Outputs:
        return (grouped_experts(x, experts.gate_up, experts.down, weights, ids, "silu"),)

    def twin() -> Outputs:
        return (experts.forward_torch(x, weights, ids),)

    return fast, twin, dtype


def packed_case(linear: PackedLinear, dtype: torch.dtype) -> Case:
    """A GPTQ / AWQ linear's loaded integers over random rows of x (a decode-sized and a prefill-sized
    step, whose row blocks differ): the Triton w4a16 kernel against dequantize-then-matmul
    (`PackedLinear.forward_torch`)."""
    part = linear.weights[0]
    in_features = part.in_features
    device = part.values.device
    g = _generator(device)
    steps = [torch.randn(rows, in_features, generator=g, device=device).to(dtype) for rows in PACKED_ROWS]

    def fast() -> Outputs:
        return tuple(linear.forward_triton(x, None) for x in steps)

    def twin() -> Outputs:
        return tuple(linear.forward_torch(x, None) for x in steps)

    return fast, twin, dtype


def decode_graph_case(
    graphs: DecodeGraphs, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int, vocab_size: int
) -> Case:
    """One decode step replayed from its captured graph against the same padded forward run eagerly.

    Fills the blocks it reads with random K/V first (warmup precedes every request, so no one's
    cache is overwritten); both runs store the same K/V into the same slots.
    """
    device, dtype = kv_caches[0][0].device, kv_caches[0][0].dtype
    num_blocks = kv_caches[0][0].shape[0]
    limit = min(num_blocks * block_size, graphs.max_model_len)
    seq_lens = [n for n in DECODE_SEQ_LENS if n <= limit][: graphs.buckets[-1]] or [1]
    table = list(range(min(num_blocks, -(-max(seq_lens) // block_size))))
    g = _generator(device)
    for k_cache, v_cache in kv_caches:
        for cache in (k_cache, v_cache):
            noise = torch.randn(cache[: len(table)].shape, generator=g, device=device)
            cache[: len(table)] = noise.to(cache.dtype)
    tokens = torch.randint(vocab_size, (max(seq_lens),), generator=g, device=device).tolist()
    greedy = SamplingParams()
    states = [
        (RequestState(-1, tokens[:n], n, greedy, 0, table, None, num_computed_tokens=n - 1), 1)
        for n in seq_lens
    ]
    plan = plan_batch(states, block_size)
    adapters = [0] * len(seq_lens)

    def run(captured: bool) -> Callable[[], Outputs]:
        def go() -> Outputs:
            graphs.is_captured = captured
            try:
                return (graphs.run(plan, adapters).clone(),)
            finally:
                graphs.is_captured = True

        return go

    return run(True), run(False), dtype
