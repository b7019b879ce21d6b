"""Paged attention: the batched SDPA path and the per-sequence reference both equal dense attention."""

from __future__ import annotations

import pytest
import torch

from loraxpy.kernels.attention import (
    AttentionMetadata,
    paged_attention_reference,
    paged_attention_sdpa,
    store_kv,
)

IMPLEMENTATIONS = [paged_attention_reference, paged_attention_sdpa]


def dense_attention(q, k, v, q_len, scale, window):
    """Plain causal attention for one sequence over contiguous K/V: the oracle."""
    s_len, group = k.shape[0], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    q_pos = torch.arange(s_len - q_len, s_len)[:, None]
    k_pos = torch.arange(s_len)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return torch.einsum(
        "hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v.double()
    ).float()


def build_case(query_lens, seq_lens, *, heads=4, kv_heads=2, dim=16, block_size=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 3
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, dim)
    v_cache = torch.zeros_like(k_cache)
    order = torch.randperm(num_blocks, generator=gen).tolist()  # non-contiguous block tables
    tables, keys, values = [], [], []
    for s_len in seq_lens:
        n = -(-s_len // block_size)
        tables.append([order.pop() for _ in range(n)])
        k = torch.randn(s_len, kv_heads, dim, generator=gen)
        v = torch.randn(s_len, kv_heads, dim, generator=gen)
        slots = torch.tensor(
            [tables[-1][p // block_size] * block_size + p % block_size for p in range(s_len)]
        )
        store_kv(k, v, k_cache, v_cache, slots)
        keys.append(k)
        values.append(v)
    query = torch.randn(sum(query_lens), heads, dim, generator=gen)
    meta = AttentionMetadata.build(list(query_lens), list(seq_lens), tables, torch.device("cpu"))
    return query, k_cache, v_cache, meta, keys, values


CASES = {
    "prefill of several lengths": ((5, 17, 1), (5, 17, 1)),
    "decode over long contexts": ((1, 1, 1), (40, 7, 64)),
    "chunked prefill": ((6, 9), (20, 9)),
    "prefill and decode mixed": ((12, 1, 3), (12, 33, 10)),
    "single token": ((1,), (1,)),
    "equal fresh prompts (causal, no mask)": ((9, 9, 9), (9, 9, 9)),
    "equal chunks over different contexts": ((4, 4), (10, 23)),
}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize(("heads", "kv_heads", "block_size"), [(4, 4, 4), (6, 2, 1), (8, 2, 16), (4, 1, 4)])
def test_paged_attention_equals_dense_attention(impl, case, window, heads, kv_heads, block_size) -> None:
    query_lens, seq_lens = CASES[case]
    query, k_cache, v_cache, meta, keys, values = build_case(
        query_lens, seq_lens, heads=heads, kv_heads=kv_heads, block_size=block_size
    )
    out = impl(query, k_cache, v_cache, meta, 0.25, window)
    start = 0
    for q_len, k, v in zip(query_lens, keys, values, strict=True):
        expected = dense_attention(query[start : start + q_len], k, v, q_len, 0.25, window)
        torch.testing.assert_close(out[start : start + q_len], expected, atol=1e-5, rtol=1e-5)
        start += q_len


def test_sdpa_path_equals_reference_in_bfloat16() -> None:
    query, k_cache, v_cache, meta, _, _ = build_case((7, 1, 4), (7, 30, 12))
    args = (query.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), meta, 0.25, None)
    torch.testing.assert_close(
        paged_attention_sdpa(*args).float(), paged_attention_reference(*args).float(), atol=2e-2, rtol=2e-2
    )


@pytest.mark.parametrize(
    ("query_lens", "seq_lens", "window"),
    [((7, 7), (7, 7), None), ((7, 1, 4), (7, 30, 12), None), ((1, 1), (9, 20), 6)],
    ids=["fresh-causal", "mixed", "decode-window"],
)
def test_soft_capped_sdpa_path_equals_the_soft_capped_reference(query_lens, seq_lens, window) -> None:
    """Gemma 2's cap * tanh(scores / cap): the SDPA path's explicit twin against the per-sequence loop,
    with a cap small enough (scores reach several times it) that capping changes the result."""
    query, k_cache, v_cache, meta, _, _ = build_case(query_lens, seq_lens)
    args = (query * 4, k_cache, v_cache, meta, 0.5, window)
    capped = paged_attention_sdpa(*args, softcap=1.0)
    torch.testing.assert_close(capped, paged_attention_reference(*args, softcap=1.0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(capped, paged_attention_reference(*args), atol=1e-3)


def test_store_kv_writes_exactly_the_given_slots() -> None:
    k_cache = torch.zeros(3, 4, 1, 2)
    v_cache = torch.zeros_like(k_cache)
    key = torch.arange(6.0).view(3, 1, 2) + 1
    store_kv(key, -key, k_cache, v_cache, torch.tensor([9, 0, 5]))
    flat = k_cache.view(12, 2)
    assert (
        torch.equal(flat[9], key[0, 0])
        and torch.equal(flat[0], key[1, 0])
        and torch.equal(flat[5], key[2, 0])
    )
    untouched = [i for i in range(12) if i not in (0, 5, 9)]
    assert flat[untouched].abs().sum() == 0
    assert torch.equal(v_cache.view(12, 2)[5], -key[2, 0])


def test_sdpa_layout_is_derived_once_per_step_and_shared_by_layers() -> None:
    query, k_cache, v_cache, meta, _, _ = build_case((3, 1), (3, 9))
    first = paged_attention_sdpa(query, k_cache, v_cache, meta, 0.25, None)
    (layout,) = meta.derived.values()
    again = paged_attention_sdpa(query, k_cache, v_cache, meta, 0.25, None)
    assert list(meta.derived.values()) == [layout]  # the second layer reused it
    torch.testing.assert_close(first, again)
    paged_attention_sdpa(query, k_cache, v_cache, meta, 0.25, 2)
    assert len(meta.derived) == 2  # a sliding-window layer has its own mask
