"""Triton paged attention and KV store: the CUDA twins of `kernels/attention.py`.

- `store_kv_triton`: k_cache[slot_mapping[t]] = key[t] (and v) for every t with slot_mapping[t] >= 0;
  rows with slot -1 are padding (a CUDA graph's unused rows) and write nothing.
- `paged_attention_triton`: out[t] = softmax(scale · q_t K_s^T + mask) V_s over sequence s's cached
  keys, the same result as `paged_attention_reference`, for prefill, chunked prefill and decode
  rows in one launch.

One attention program owns one (sequence, KV head, tile of query tokens): its rows are the tile's
tokens × the query heads that share the KV head (GQA), so each K/V block is read once per group,
not once per query head, and a decode step is one program per (sequence, KV head). It walks the
sequence's block table with an online softmax (flash attention), stopping at the tile's last
query position (causal) and starting at the sliding window's first key. Everything per sequence
is read on the device, so the launch needs no host synchronisation and can be captured in a CUDA
graph (padded sequences have no query tokens and return at once).
`TRITON_INTERPRET=1` runs the same kernels on CPU, which is how the tests compare them with torch.
"""

from __future__ import annotations

from typing import Any

import torch

from loraxpy.kernels.attention import AttentionMetadata
from loraxpy.kernels.triton_launch import Launch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None


# fp32 stays fp32 on tensor cores (tl.dot would round it to tf32), so fp32 runs match HF's to 1e-4.
DOT_PRECISION = {torch.float32: "ieee"}


def available() -> bool:
    return triton is not None


# The kernels are plain functions here and JIT-decorated on first use by `jit_kernels()` (so
# TRITON_INTERPRET set by a test takes effect); `kernels/triton_aot.py` compiles the same functions.
def store_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_vt,
    ROW: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    offs = tl.arange(0, BLOCK)
    ok = offs < ROW
    dst = slot.to(tl.int64) * ROW + offs
    k = tl.load(key_ptr + t.to(tl.int64) * stride_kt + offs, mask=ok)
    v = tl.load(value_ptr + t.to(tl.int64) * stride_vt + offs, mask=ok)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    query_start_ptr, seq_lens_ptr, block_tables_ptr,
    scale, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CACHE_BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_tile = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len  # position of the sequence's first query token

    # Rows: (query token of the tile, query head of the group), flattened.
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    token = q_tile * BLOCK_Q + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (token < q_len) & (rows % GROUP_PAD < GROUP)
    q_pos = first_pos + token
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_off = (q_start + token).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    m_i = tl.full((BLOCK_Q * GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_Q * GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q * GROUP_PAD, BLOCK_D), dtype=tl.float32)
    kv_end = tl.minimum(seq_len, first_pos + (q_tile + 1) * BLOCK_Q)  # causal: up to the tile's last
    kv_begin = 0
    if HAS_WINDOW:
        kv_begin = tl.maximum(0, first_pos + q_tile * BLOCK_Q - window + 1)
        kv_begin = (kv_begin // BLOCK_N) * BLOCK_N
    for n0 in range(kv_begin, kv_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_ok = pos < kv_end
        block = tl.load(block_tables_ptr + seq * stride_bt + pos // CACHE_BLOCK, mask=pos_ok, other=0)
        cache_off = (
            block.to(tl.int64)[:, None] * stride_cb
            + (pos % CACHE_BLOCK)[:, None] * stride_cs
            + kv_head * stride_ch
            + dims[None, :]
        )
        kv_mask = pos_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + cache_off, mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
        allowed = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :]
        if HAS_WINDOW:
            allowed &= pos[None, :] > q_pos[:, None] - window
        scores = tl.where(allowed, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key allowed yet
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(v_cache_ptr + cache_off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_off = (q_start + token).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


_kernels: dict[str, Any] = {}


def jit_kernels() -> dict[str, Any]:
    """The kernels JIT-decorated (in Triton's interpreter when TRITON_INTERPRET=1), by function name."""
    if _kernels or triton is None:
        return _kernels
    _kernels[store_kernel.__name__] = triton.jit(store_kernel)
    # stride_bt follows the step's widest block table: specialised (== 1, multiple of 16) it would
    # compile up to three variants while serving, instead of the one the AOT checks compile.
    _kernels[attention_kernel.__name__] = triton.jit(do_not_specialize=["stride_bt"])(attention_kernel)
    return _kernels


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def store_launch(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> Launch:
    """The store launch for these tensors: a program per token row."""
    # key, value: [num_tokens, num_kv_heads, head_dim]; caches contiguous [blocks, block_size, kv_heads, head_dim]
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    num_tokens, row = key.shape[0], key.shape[1] * key.shape[2]
    key, value = key.reshape(num_tokens, row), value.reshape(num_tokens, row)
    assert key.stride(1) == 1 and value.stride(1) == 1
    return Launch(
        store_kernel,
        grid=(num_tokens,),
        args=(key, value, k_cache, v_cache, slot_mapping, key.stride(0), value.stride(0)),
        constexprs={"ROW": row, "BLOCK": _next_power_of_2(row)},
    )


def store_kv_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k_cache[slot_mapping[t]] = key[t] and likewise for v, for every t with slot_mapping[t] >= 0."""
    if key.shape[0] == 0:
        return
    store_launch(key, value, k_cache, v_cache, slot_mapping).run(jit_kernels())


def attention_launch(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
) -> Launch:
    """The attention launch for this step: tile sizes from the heads and whether any row is a prompt."""
    # query, out: [num_tokens, num_heads, head_dim]; caches contiguous [blocks, block_size, kv_heads, head_dim]
    assert query.stride(2) == 1 and out.stride(2) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, cache_block = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    group_pad = _next_power_of_2(group)
    block_d = max(16, _next_power_of_2(head_dim))
    is_decode = meta.max_query_len == 1
    # At least 16 rows per tile (tensor cores); decode tiles hold one token, prefill tiles several:
    # 64 rows, fewer for wide heads (fp32 past 64 dims, 16-bit past 128) so the tile stays in registers.
    prompt_rows = max(16, (64 * 64 if query.dtype == torch.float32 else 64 * 128) // max(64, block_d))
    block_q = max(1, 16 // group_pad) if is_decode else max(1, min(64, prompt_rows) // group_pad)
    block_n, num_warps = _key_tile(query.dtype, block_q * group_pad, block_d, is_decode)
    args = (
        query, k_cache, v_cache, out,
        meta.query_start_loc, meta.seq_lens, meta.block_tables,
        scale, sliding_window or 0,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
    )  # fmt: skip
    constexprs = {
        "HEAD_DIM": head_dim, "GROUP": group, "GROUP_PAD": group_pad,
        "BLOCK_Q": block_q, "BLOCK_N": block_n, "BLOCK_D": block_d,
        "CACHE_BLOCK": cache_block, "HAS_WINDOW": sliding_window is not None,
        "PRECISION": DOT_PRECISION.get(query.dtype, "tf32"),
    }  # fmt: skip
    grid = (meta.seq_lens.shape[0], num_kv_heads, -(-meta.max_query_len // block_q))
    return Launch(attention_kernel, grid, args, constexprs, {"num_warps": num_warps})


def _key_tile(dtype: torch.dtype, rows: int, block_d: int, is_decode: bool) -> tuple[int, int]:
    """(keys per step, warps) that keep a program's tiles in registers on sm_80 and sm_90.

    The largest tile that compiles without spilling on both (docs/triton-kernels.md): fp32's IEEE
    dot runs on CUDA cores and holds far more per thread, so its prompt tiles step 16 keys at a
    time and it uses 8 warps, and so do its decode tiles for heads wider than 64 (Phi-3's 96,
    Gemma's 256); a 16-bit 64-row × 128-dim prompt tile needs 8 warps on sm_80.
    """
    if dtype == torch.float32:  # decode: 64 keys of up to 64 dims, 16 for wider heads (Phi-3's 96)
        return (64 if is_decode and block_d <= 64 else 16), 8
    return 64, (8 if rows * block_d >= 64 * 128 else 4)


def paged_attention_triton(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Same result as `paged_attention_reference`, one launch for every sequence of the step."""
    # query: [num_tokens, num_heads, head_dim] -> out: same shape
    out = torch.empty_like(query)
    if query.shape[0] == 0 or meta.seq_lens.shape[0] == 0:
        return out
    attention_launch(query, k_cache, v_cache, out, meta, scale, sliding_window).run(jit_kernels())
    return out
