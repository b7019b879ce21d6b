"""Paged KV cache writes and attention over it.

Cache layout per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]; a token's
slot is block_id * block_size + offset. Query token i of sequence s sits at position
p = seq_len[s] - query_len[s] + i and attends to cached positions j <= p (and j > p - window
when the layer has a sliding window, as HF transformers' sliding-window mask does).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-sequence layout of one forward pass; host copies let kernels avoid device syncs."""

    query_start_loc: torch.Tensor  # [num_seqs + 1] int64: offsets into the flattened token dim
    seq_lens: torch.Tensor  # [num_seqs] int64: cached tokens after this step, per sequence
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    query_lens_host: tuple[int, ...]
    seq_lens_host: tuple[int, ...]
    max_query_len: int
    max_seq_len: int
    # Per-step tensors a backend derives once and every layer reuses (e.g. the SDPA gather and mask).
    derived: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(
        cls, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], device: torch.device
    ) -> AttentionMetadata:
        width = max(len(t) for t in block_tables)
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        return cls(
            query_start_loc=torch.tensor(starts, dtype=torch.int64, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int64, device=device),
            query_lens_host=tuple(query_lens),
            seq_lens_host=tuple(seq_lens),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k_cache[slot_mapping[t]] = key[t] and likewise for v, for every t with slot_mapping[t] >= 0."""
    # key, value: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens] int64, -1 = padding
    # rows (a decode graph's bucket) store nothing. They reach this torch path only on CPU, as
    # graphs need the Triton backend; checking on CUDA would cost a host sync in every layer.
    if slot_mapping.device.type == "cpu" and bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def _allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    return allowed


def paged_attention_reference(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """out[t] = softmax(scale · q_t K_s^T + mask) V_s over sequence s's cached keys; a per-sequence loop.

    With `softcap` (Gemma 2), the scaled scores become softcap * tanh(scores / softcap) before the mask.
    """
    # query: [num_tokens, num_heads, head_dim] -> out: same shape
    block_size = k_cache.shape[1]
    group = query.shape[1] // k_cache.shape[2]
    out = torch.empty_like(query)
    start = 0
    for s, (q_len, s_len) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host, strict=True)):
        positions = torch.arange(s_len, device=query.device)
        slots = meta.block_tables[s, positions // block_size] * block_size + positions % block_size
        k = k_cache.view(-1, *k_cache.shape[2:])[slots].float().repeat_interleave(group, dim=1)
        v = v_cache.view(-1, *v_cache.shape[2:])[slots].float().repeat_interleave(group, dim=1)
        q = query[start : start + q_len].float()
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        q_pos = positions[s_len - q_len :, None]
        scores = scores.masked_fill(~_allowed(q_pos, positions[None, :], sliding_window), float("-inf"))
        out[start : start + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(query.dtype)
        start += q_len
    return out


@dataclass(frozen=True)
class _SdpaLayout:
    """What every layer's SDPA call shares in one step: computed by the first layer, reused by the rest."""

    slots: torch.Tensor  # [num_seqs * max_seq_len]: cache slot of each sequence's key positions
    q_valid: torch.Tensor | None  # [num_seqs, max_query_len] real query rows; None: every row is real
    mask: torch.Tensor | None  # [num_seqs, 1, max_query_len, max_seq_len]; None: plain causal
    is_causal: bool


def _sdpa_layout(meta: AttentionMetadata, block_size: int, sliding_window: int | None) -> _SdpaLayout:
    key = ("sdpa", block_size, sliding_window)
    layout = meta.derived.get(key)
    if layout is None:
        layout = meta.derived[key] = _build_sdpa_layout(meta, block_size, sliding_window)
    return layout


def _build_sdpa_layout(meta: AttentionMetadata, block_size: int, sliding_window: int | None) -> _SdpaLayout:
    num_seqs, device = len(meta.seq_lens_host), meta.seq_lens.device
    key_pos = torch.arange(meta.max_seq_len, device=device)
    blocks = meta.block_tables.gather(1, (key_pos // block_size).expand(num_seqs, -1))
    slots = (blocks * block_size + key_pos % block_size).flatten()
    same_q = len(set(meta.query_lens_host)) == 1
    windowed = sliding_window is not None and sliding_window < meta.max_seq_len
    # Equal fresh prompts (or one sequence's whole prompt): causal SDPA needs no mask at all.
    if same_q and meta.query_lens_host == meta.seq_lens_host and not windowed:
        return _SdpaLayout(slots, None, None, is_causal=True)
    q_lens = torch.tensor(meta.query_lens_host, device=device)
    q_idx = torch.arange(meta.max_query_len, device=device)
    q_valid = q_idx[None, :] < q_lens[:, None]  # [num_seqs, max_query_len]
    # Mask: causal + window + padding keys; padded query rows keep key 0 so no row is all -inf.
    q_pos = (meta.seq_lens - q_lens)[:, None] + q_idx[None, :]  # [num_seqs, max_query_len]
    allowed = _allowed(q_pos[:, :, None], key_pos[None, None, :], sliding_window)
    allowed &= key_pos[None, None, :] < meta.seq_lens[:, None, None]
    allowed |= ~q_valid[:, :, None] & (key_pos == 0)[None, None, :]
    return _SdpaLayout(slots, None if same_q else q_valid, allowed[:, None], is_causal=False)


def paged_attention_sdpa(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Same result as `paged_attention_reference`: gathers padded K/V per sequence, one SDPA call.

    Decode steps and equal-length chunks view the queries in place; only uneven chunks are padded.
    SDPA has no soft-capping: with `softcap` the same gathered layout goes through explicit matmuls.
    """
    num_seqs = len(meta.seq_lens_host)
    layout = _sdpa_layout(meta, k_cache.shape[1], sliding_window)
    # Gather every sequence's keys into [num_seqs, max_seq_len, kv_heads, head_dim].
    kv_shape = (num_seqs, meta.max_seq_len, *k_cache.shape[2:])
    k = k_cache.view(-1, k_cache.shape[2] * k_cache.shape[3]).index_select(0, layout.slots).view(kv_shape)
    v = v_cache.view(-1, v_cache.shape[2] * v_cache.shape[3]).index_select(0, layout.slots).view(kv_shape)
    out_dtype = query.dtype
    if query.device.type == "cpu" and out_dtype != torch.float32:
        # CPU SDPA in bf16 is ~4x slower than in fp32 for decode-sized problems (torch 2.13, AVX512:
        # 764 vs 188 us at 16 seqs x 9 heads x 80 keys), so half-precision caches attend in fp32.
        query, k, v = query.float(), k.float(), v.float()
    return _attend_gathered(query, k, v, meta, layout, scale, softcap).to(out_dtype)


def _attend_gathered(
    query: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    layout: _SdpaLayout,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """One SDPA call (or the soft-capped matmuls) over K/V gathered to [num_seqs, max_seq_len, kv_heads,
    head_dim]; query [num_tokens, heads, head_dim] -> the same shape, in the inputs' dtype."""
    num_seqs, num_heads, head_dim = len(meta.seq_lens_host), query.shape[1], query.shape[2]
    if layout.q_valid is None:
        q = query.view(num_seqs, meta.max_query_len, num_heads, head_dim)
    else:  # scatter queries into [num_seqs, max_query_len, heads, head_dim]
        q = query.new_zeros(num_seqs, meta.max_query_len, num_heads, head_dim)
        q[layout.q_valid] = query
    attend = (
        F.scaled_dot_product_attention
        if softcap is None
        else functools.partial(_softcapped_attention, softcap=softcap)
    )
    out = attend(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=layout.mask,
        is_causal=layout.is_causal,
        scale=scale,
        enable_gqa=num_heads != k.shape[2],
    ).transpose(1, 2)
    return out.reshape(query.shape) if layout.q_valid is None else out[layout.q_valid]


def _softcapped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    enable_gqa: bool,
    softcap: float,
) -> torch.Tensor:
    """SDPA's contract (q [S, H, Lq, d], k/v [S, KV, L, d], boolean mask) with scores soft-capped, in fp32."""
    group = q.shape[1] // k.shape[1]
    if enable_gqa:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        attn_mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v.float()).to(q.dtype)


# --kv-cache-dtype fp8: K and V stored as e4m3 over one scale per cache tensor, 1.0 (no calibration,
# vLLM's default without checkpoint scales): e4m3 keeps 3 mantissa bits over 2^-9..448, values past 448
# are clamped to it.
FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_KV_SCALE = 1.0
_FP8_MAX = torch.finfo(FP8_KV_DTYPE).max


def store_kv_fp8(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """`store_kv` into e4m3 caches: each value divided by the scale, clamped to e4m3's range, rounded."""
    if slot_mapping.device.type == "cpu" and bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    for x, cache in ((key, k_cache), (value, v_cache)):
        q = (x.float() / FP8_KV_SCALE).clamp(-_FP8_MAX, _FP8_MAX).to(FP8_KV_DTYPE)
        # index_copy_ has no float8 kernel on CPU: the bytes are copied instead
        cache.view(torch.uint8).view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, q.view(torch.uint8))


@functools.cache
def _e4m3_values(device: torch.device) -> torch.Tensor:
    """fp32 [256]: the value of each e4m3 byte (a table lookup converts 5x faster on CPU than `.float()`)."""
    return torch.arange(256, dtype=torch.uint8, device=device).view(FP8_KV_DTYPE).float()


def dequantize_kv_fp8(cache: torch.Tensor) -> torch.Tensor:
    """e4m3 values (any shape) → fp32 times the scale."""
    values = _e4m3_values(cache.device).index_select(0, cache.view(torch.uint8).reshape(-1).int())
    return values.view(cache.shape).mul_(FP8_KV_SCALE)


def paged_attention_sdpa_fp8(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """`paged_attention_sdpa` over e4m3 caches: the same gather, then K/V dequantized to fp32."""
    num_seqs = len(meta.seq_lens_host)
    layout = _sdpa_layout(meta, k_cache.shape[1], sliding_window)
    kv_shape = (num_seqs, meta.max_seq_len, *k_cache.shape[2:])
    width = k_cache.shape[2] * k_cache.shape[3]
    k = dequantize_kv_fp8(k_cache.view(torch.uint8).view(-1, width).index_select(0, layout.slots))
    v = dequantize_kv_fp8(v_cache.view(torch.uint8).view(-1, width).index_select(0, layout.slots))
    k, v = k.view(kv_shape), v.view(kv_shape)
    return _attend_gathered(query.float(), k, v, meta, layout, scale, softcap).to(query.dtype)


AttentionFn = Callable[..., torch.Tensor]
StoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
ATTENTION_BACKENDS = ("auto", "sdpa", "triton", "flash")


@dataclass(frozen=True)
class AttentionBackend:
    """The K/V store and the attention over the paged cache that every layer uses."""

    name: str
    attend: AttentionFn
    store: StoreFn
    # What the startup self-check tries next if this one fails (None: SDPA), e.g. auto's flash → triton.
    fallback: AttentionBackend | None = None


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3fn")  # auto: the model's dtype; fp8 names e4m3


def select_attention_backend(
    device: torch.device,
    requested: str = "auto",
    kv_cache_dtype: str = "auto",
    *,
    dtype: torch.dtype | None = None,
    block_size: int | None = None,
    graphs: bool = False,
) -> AttentionBackend:
    """Chooses the attention implementation once, at startup; the name is logged and reported by Info.

    auto: on CUDA, flash-attn / vllm-flash-attn where one is importable and takes `dtype` and
    `block_size` (kernels/attention_flash.py), else Triton when installed, else torch SDPA (the CPU
    path; with `graphs`, the decode CUDA graphs asked for, Triton, which they need, when installed);
    the startup self-check keeps a fast path only if it matches SDPA, and falls back along
    flash → Triton → SDPA. An fp8 KV cache runs on SDPA over dequantized K/V ("sdpa-fp8"); the
    Triton and flash kernels read only the model's dtype.
    """
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {requested!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(
            f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}"
        )
    if kv_cache_dtype != "auto":
        if requested in ("triton", "flash"):
            raise ValueError(
                "--kv-cache-dtype fp8 runs on the SDPA attention (K/V dequantized after the gather); the "
                f"{'Triton' if requested == 'triton' else 'flash'} attention kernels read only the model's "
                "dtype: use --attention-backend sdpa or auto"
            )
        return AttentionBackend("sdpa-fp8", paged_attention_sdpa_fp8, store_kv_fp8)
    sdpa = AttentionBackend("sdpa", paged_attention_sdpa, store_kv)
    if requested == "sdpa" or (requested == "auto" and device.type != "cuda"):
        return sdpa
    if requested == "flash":
        return _flash_backend(dtype, block_size, required=True) or sdpa
    from loraxpy.kernels import attention_triton  # imports triton: only where it may be used

    triton = (
        AttentionBackend("triton", attention_triton.paged_attention_triton, attention_triton.store_kv_triton)
        if attention_triton.available()
        else None
    )
    if requested == "triton":
        if triton is None:
            raise ValueError("attention backend 'triton' needs the triton package")
        return triton
    flash = _flash_backend(
        dtype, block_size, required=False, fallback=triton, graphs=graphs and triton is not None
    )
    return flash or triton or sdpa


def _flash_backend(
    dtype: torch.dtype | None,
    block_size: int | None,
    required: bool,
    fallback: AttentionBackend | None = None,
    graphs: bool = False,
) -> AttentionBackend | None:
    """flash-attn / vllm-flash-attn's backend if one is importable and takes `dtype` and `block_size`
    (and, for auto, no decode graphs are wanted: they capture the Triton kernels only); else None
    (auto: with a log line saying why), or a ValueError when `required`."""
    from loraxpy.kernels import attention_flash

    library = attention_flash.find_library()
    if library is None:
        if required:
            raise ValueError("attention backend 'flash' needs flash-attn or vllm-flash-attn installed")
        return None
    reason = attention_flash.unusable_reason(library, dtype, block_size)
    if reason is None and graphs:
        reason = "the decode CUDA graphs (--cuda-graph-max-batch-size) capture the Triton attention only"
    if reason is not None:
        if required:
            raise ValueError(f"--attention-backend flash: {reason}")
        logger.info("attention: %s is installed but not used: %s", library.name, reason)
        return None
    return attention_flash.flash_backend(library, fallback)
