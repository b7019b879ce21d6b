"""The CUDA fast paths against their torch twins, compiled on a real GPU (skipped without CUDA).

The CPU suite already runs the Triton kernels in Triton's interpreter, and the integration tests
run on CUDA when one is present (the worker picks it); these add what only a GPU can show: bf16
kernels (the interpreter cannot multiply bf16), and CUDA-graph replays equal to the eager twin.
"""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 37])
def test_triton_attention_equals_the_reference_on_cuda(dtype: torch.dtype, window: int | None) -> None:
    from test_attention import build_case

    from loraxpy.kernels.attention import AttentionMetadata, paged_attention_reference
    from loraxpy.kernels.attention_triton import paged_attention_triton

    query, k_cache, v_cache, meta, _, _ = build_case(
        (150, 1, 70, 1), (150, 700, 90, 33), heads=32, kv_heads=8, dim=128, block_size=16
    )
    meta = AttentionMetadata.build(
        list(meta.query_lens_host), list(meta.seq_lens_host), meta.block_tables.tolist(), CUDA
    )
    args = (query.to(CUDA, dtype), k_cache.to(CUDA, dtype), v_cache.to(CUDA, dtype), meta, 0.088, window)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(
        paged_attention_triton(*args).float(), paged_attention_reference(*args).float(), **tol
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["all-distinct", "uniform", "skewed", "identical", "base-only"])
def test_sgmv_equals_the_torch_twin_on_cuda(dtype: torch.dtype, kind: str) -> None:
    from test_lora_kernels import IN, OUT, distribution, slot_tensors

    from loraxpy.kernels import lora, lora_triton

    ranks = [0, 4, 8, 16, 1, 16, 2, 12, 8]
    a, b = (t.to(CUDA, dtype) for t in slot_tensors(ranks))
    slots = distribution(kind, 128, random.Random(0))
    x = torch.randn(128, IN, device=CUDA).to(dtype)
    segments = lora_triton.Segments.build(slots, dict(enumerate(ranks)), CUDA)
    index = torch.tensor(slots, device=CUDA)
    v = lora_triton.sgmv_shrink(x, a, segments)
    tol = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(v.float(), lora.lora_shrink(x.float(), a.float(), index), **tol)
    y = torch.zeros(128, OUT, device=CUDA, dtype=dtype)
    lora_triton.sgmv_expand_add(v, b, segments, y)
    torch.testing.assert_close(y.float(), lora.lora_expand(v.float(), b.float(), index), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_kv_store_equals_the_torch_store_on_cuda(dtype: torch.dtype) -> None:
    """Every row lands in its slot; rows with slot -1 (a graph's padding) write nothing."""
    from loraxpy.kernels.attention import store_kv
    from loraxpy.kernels.attention_triton import store_kv_triton

    num_blocks, block_size, kv_heads, dim = 40, 16, 8, 128
    slots = torch.randperm(num_blocks * block_size, device=CUDA)[:300]
    key = torch.randn(300, kv_heads, dim, device=CUDA).to(dtype)
    value = torch.randn(300, kv_heads, dim, device=CUDA).to(dtype)
    caches = [torch.randn(num_blocks, block_size, kv_heads, dim, device=CUDA).to(dtype) for _ in range(2)]
    want = [c.clone() for c in caches]
    store_kv(key[:250], value[:250], *want, slots[:250])
    padded = torch.cat([slots[:250], torch.full((50,), -1, device=CUDA)])
    store_kv_triton(key, value, *caches, padded)
    torch.testing.assert_close(caches, want, atol=0, rtol=0)


def test_captured_decode_graphs_replay_the_eager_twin(tmp_path) -> None:
    """The same decode steps with graphs captured and without (the padded eager twin) give equal hidden states."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraxpy.worker.batch import CachedRequestData, NewRequestData, StepInput
    from loraxpy.worker.runner import ModelRunner, RunnerOptions
    from loraxpy.worker.sampling import SamplingParams

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokens = {}
    for capture in (True, False):
        runner = ModelRunner(
            tmp_path,
            RunnerOptions(
                dtype=torch.float32, device=CUDA, attention_backend="triton", cuda_graph_max_batch_size=16
            ),
        )
        runner.warmup(max_prefill_tokens=256, max_num_seqs=16, num_blocks=64)
        assert runner.graphs is not None and runner.graphs.is_captured
        runner.graphs.is_captured = capture  # False: run the same static buffers eagerly
        new = tuple(
            NewRequestData(i + 1, tuple(range(3 + i, 10 + 2 * i)), 7 + i, SamplingParams(), 0, (i * 2, i * 2 + 1), 7 + i)
            for i in range(11)
        )  # fmt: skip
        out = runner.step(StepInput(new_requests=new))
        seen = {o.id: [o.token[0]] for o in out}
        for _ in range(8):
            step = StepInput(cached_requests=tuple(CachedRequestData(i + 1, (), 1) for i in range(11)))
            for o in runner.step(step):
                seen[o.id].append(o.token[0])
        tokens[capture] = seen
    assert tokens[True] == tokens[False]


def _moe_experts(num_experts: int, top_k: int, hidden: int, size: int, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    from loraxpy.worker.layers import Shard
    from loraxpy.worker.model_config import MoeConfig
    from loraxpy.worker.moe import Experts

    moe = MoeConfig(num_experts=num_experts, top_k=top_k, expert_size=size, renormalize=True)
    experts = Experts(moe, hidden, Shard(), dtype, CUDA)
    gen = torch.Generator(device=CUDA).manual_seed(0)
    for param in (experts.gate_up, experts.down):
        param.data.copy_(torch.randn(param.shape, generator=gen, device=CUDA) / param.shape[2] ** 0.5)
    return experts


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 2), (64, 8)])
def test_triton_grouped_experts_equal_the_torch_experts_on_cuda(
    dtype: torch.dtype, num_tokens: int, num_experts: int, top_k: int
) -> None:
    """Both paths against the torch experts in fp32 on the same (rounded) weights: the kernels'
    error is the dtype's rounding, as the torch path's. Sizes end inside the kernels' tiles."""
    from loraxpy.kernels import moe_triton
    from loraxpy.worker.moe import route

    experts = _moe_experts(num_experts, top_k, 200, 328, dtype)
    assert experts.use_triton
    gen = torch.Generator(device=CUDA).manual_seed(num_tokens)
    x = torch.randn(num_tokens, 200, generator=gen, device=CUDA).to(dtype)
    weights, ids = route(torch.randn(num_tokens, num_experts, generator=gen, device=CUDA), top_k, True)
    reference = _moe_experts(num_experts, top_k, 200, 328, torch.float32)
    reference.gate_up.data.copy_(experts.gate_up.float())
    reference.down.data.copy_(experts.down.float())
    want = reference.forward_torch(x.float(), weights, ids)
    got = experts(x, weights, ids)
    torch.testing.assert_close(
        got, moe_triton.grouped_experts(x, experts.gate_up, experts.down, weights, ids)
    )
    # relative L2 error: fp32 stays fp32 (ieee dots); fp16/bf16 as the startup self-check allows
    tolerance = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]
    assert _relative_error(got, want) < tolerance
    assert _relative_error(experts.forward_torch(x, weights, ids), want) < tolerance


def test_triton_grouped_experts_need_no_host_sync_and_replay_in_a_cuda_graph() -> None:
    from loraxpy.kernels import moe_triton
    from loraxpy.worker.moe import route

    experts = _moe_experts(16, 4, 128, 192, torch.bfloat16)
    x = torch.randn(12, 128, device=CUDA).to(torch.bfloat16)
    weights, ids = route(torch.randn(12, 16, device=CUDA), 4, True)
    moe_triton.grouped_experts(x, experts.gate_up, experts.down, weights, ids)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moe_triton.grouped_experts(x, experts.gate_up, experts.down, weights, ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_triton.grouped_experts(x, experts.gate_up, experts.down, weights, ids)
    new_weights, new_ids = route(torch.randn(12, 16, device=CUDA), 4, True)
    weights.copy_(new_weights)
    ids.copy_(new_ids)
    graph.replay()
    assert _relative_error(out, experts.forward_torch(x, weights, ids)) < 2e-2  # the new routing's


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["gptq act-order g32", "awq g32", "gptq 8-bit act-order g16"])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_triton_w4a16_equals_dequantize_then_matmul_on_cuda(dtype: torch.dtype, case: str, rows: int) -> None:
    """The packed linear on CUDA takes the kernel; it and the twin against the float64 product of the
    drawn integers, within the dtype's rounding (relative L2 error, as the startup self-check)."""
    from test_w4a16_triton import CASES, IN, _checkpoint, _dense, _part

    from loraxpy.worker.gptq import PackedLinear

    config, tensors, drawn = _checkpoint(*CASES[case], seed=len(case))
    linear = PackedLinear([_part(config, tensors)]).to(CUDA)
    linear.use_triton = True
    x = torch.randn(rows, IN, generator=torch.Generator().manual_seed(rows)).to(dtype)
    want = _dense(x.float(), drawn)
    got = linear(x.to(CUDA), None)
    tolerance = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]
    assert got.dtype == dtype and _relative_error(got.cpu(), want) < tolerance
    assert _relative_error(linear.forward_torch(x.to(CUDA), None).cpu(), want) < tolerance


def _flash_library():  # type: ignore[no-untyped-def]
    from loraxpy.kernels import attention_flash

    library = attention_flash.find_library()
    if library is None:
        pytest.skip("neither flash-attn nor vllm-flash-attn is importable (the GPU image has neither)")
    return library


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (37, None), (None, 30.0)])
def test_flash_attention_equals_the_reference_on_cuda(
    dtype: torch.dtype, window: int | None, softcap: float | None
) -> None:
    """kernels/attention_flash.py over the library's paged kernel, at the library's block size."""
    from test_attention import build_case

    from loraxpy.kernels import attention_flash
    from loraxpy.kernels.attention import AttentionMetadata, paged_attention_reference

    library = _flash_library()
    backend = attention_flash.flash_backend(library)
    # prefill, decode, a chunk over a cached prefix, a decode past several blocks
    query, k_cache, v_cache, meta, _, _ = build_case(
        (150, 1, 70, 1), (150, 700, 90, 33), heads=32, kv_heads=8, dim=128, block_size=library.block_multiple
    )
    meta = AttentionMetadata.build(
        list(meta.query_lens_host), list(meta.seq_lens_host), meta.block_tables.tolist(), CUDA
    )
    args = (
        query.to(CUDA, dtype),
        k_cache.to(CUDA, dtype),
        v_cache.to(CUDA, dtype),
        meta,
        0.088,
        window,
        softcap,
    )
    torch.testing.assert_close(
        backend.attend(*args).float(), paged_attention_reference(*args).float(), atol=2e-2, rtol=2e-2
    )
