"""The Triton paged attention and KV store against their torch twins, in Triton's interpreter on CPU.

On CUDA the same comparisons run compiled (tests/gpu); here the interpreter executes the kernels'
own code (GQA row packing, block-table walk, online softmax, causal and window bounds, padding).
"""

from __future__ import annotations

import os

import pytest
import torch
from test_attention import CASES, build_case, dense_attention

from loraxpy.kernels.attention import AttentionMetadata, paged_attention_reference, store_kv

triton = pytest.importorskip("triton", reason="triton is a dev dependency (make install)")


@pytest.fixture(scope="module")
def kernels():
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets it"
    from loraxpy.kernels import attention_triton

    assert attention_triton.available()
    return attention_triton


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "block_size", "dim"),
    [(4, 4, 4, 16), (6, 2, 1, 16), (8, 2, 16, 24), (4, 1, 4, 16), (9, 3, 16, 8)],
)
def test_triton_attention_equals_dense_attention(
    kernels, case, window, heads, kv_heads, block_size, dim
) -> None:
    query_lens, seq_lens = CASES[case]
    query, k_cache, v_cache, meta, keys, values = build_case(
        query_lens, seq_lens, heads=heads, kv_heads=kv_heads, block_size=block_size, dim=dim
    )
    out = kernels.paged_attention_triton(query, k_cache, v_cache, meta, 0.25, window)
    start = 0
    for q_len, k, v in zip(query_lens, keys, values, strict=True):
        expected = dense_attention(query[start : start + q_len], k, v, q_len, 0.25, window)
        torch.testing.assert_close(out[start : start + q_len], expected, atol=1e-5, rtol=1e-5)
        start += q_len


def test_long_prefill_spans_several_query_tiles_and_key_blocks(kernels) -> None:
    query, k_cache, v_cache, meta, _, _ = build_case((150, 1, 70), (150, 200, 90), block_size=16)
    for window in (None, 37):
        out = kernels.paged_attention_triton(query, k_cache, v_cache, meta, 0.25, window)
        expected = paged_attention_reference(query, k_cache, v_cache, meta, 0.25, window)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# bf16 runs in tests/gpu only: Triton 3.9's interpreter multiplies bf16 operands of tl.dot as raw
# bit patterns (a 16x16 product comes out ~1e10 off), so it cannot judge a bf16 kernel on CPU.
@pytest.mark.parametrize("dtype", [torch.float16])
def test_triton_attention_equals_the_reference_in_half_precision(kernels, dtype) -> None:
    query, k_cache, v_cache, meta, _, _ = build_case((7, 1, 4), (7, 30, 12))
    args = (query.to(dtype), k_cache.to(dtype), v_cache.to(dtype), meta, 0.25, None)
    out = kernels.paged_attention_triton(*args)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), paged_attention_reference(*args).float(), atol=2e-2, rtol=2e-2)


def test_padded_sequences_without_query_tokens_are_skipped(kernels) -> None:
    """A CUDA graph's unused sequences have no query tokens and seq_len 0: nothing is read or written."""
    query, k_cache, v_cache, _, _, _ = build_case((1, 1), (9, 4))
    padded = AttentionMetadata.build(
        [1, 0, 1, 0], [9, 0, 4, 0], [[0, 1, 2], [0], [3], [0]], torch.device("cpu")
    )
    unpadded = AttentionMetadata.build([1, 1], [9, 4], [[0, 1, 2], [3]], torch.device("cpu"))
    out = kernels.paged_attention_triton(query, k_cache, v_cache, padded, 0.25)
    torch.testing.assert_close(out, paged_attention_reference(query, k_cache, v_cache, unpadded, 0.25))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_store_equals_the_torch_store_and_skips_padding_rows(kernels, dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    key, value = torch.randn(2, 5, 3, 8, generator=gen).to(dtype).unbind(0)
    slots = torch.tensor([9, -1, 0, 17, -1])
    caches = [torch.zeros(5, 4, 3, 8, dtype=dtype) for _ in range(6)]
    kernels.store_kv_triton(key, value, caches[0], caches[1], slots)
    keep = slots >= 0
    store_kv(key[keep], value[keep], caches[2], caches[3], slots[keep])
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    store_kv(key, value, caches[4], caches[5], slots)  # the torch twin skips padding rows too
    assert torch.equal(caches[0], caches[4]) and torch.equal(caches[1], caches[5])
