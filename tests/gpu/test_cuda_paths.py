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
