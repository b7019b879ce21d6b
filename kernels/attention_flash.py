"""Attention over the paged KV cache through flash-attn's or vllm-flash-attn's block-table kernels.

Used where either library is importable (neither installs on the lent GPU machines' torch, so this
path is unmeasured: tests/unit/test_attention_flash.py proves the layout conversion against fakes
written from the libraries' documented semantics; bench/gpu_check.py checks and times it on a GPU
that has one). Both read the cache as it is stored, [num_blocks, block_size, kv_heads, head_dim],
with int32 block tables and lengths; both align the causal mask to the bottom right (query row i of
a sequence with q query and s cached tokens sits at position s - q + i), which is this project's
position rule, and take the sliding window as (left, right) = (window - 1, 0): keys j with
p - window < j <= p, as `kernels/attention.py` defines it.

- vllm-flash-attn: `flash_attn_varlen_func(q, k_cache, v_cache, ..., block_table=...)` over the
  flattened query rows, so prefill and decode rows share one launch without padding. Its paged
  kernel takes blocks of any multiple of 16 (the default block size).
- flash-attn 2: `flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=..., block_table=...)`,
  whose queries are [num_seqs, max_query_len, heads, head_dim]: uneven query lengths are padded
  at the front of each row, so the bottom-right causal alignment puts every real query at its
  position (padding rows attend to nothing and are dropped). Its paged kernel accepts only blocks
  that are a multiple of 256 tokens (flash_api.cpp), so with the default --block-size 16 `auto`
  passes it over with a log line and `--attention-backend flash` is refused with the fix.

Both run fp16 and bf16 only. The K/V store is the torch one (`store_kv`, an index_copy on the
device). The startup self-check (`worker/self_check.py`) compares the chosen kernel with SDPA on
CUDA before serving; `auto` keeps it only if that passes and otherwise falls back to Triton (itself
checked), then SDPA.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from dataclasses import dataclass
from types import ModuleType

import torch

from loraxpy.kernels.attention import AttentionBackend, AttentionMetadata, store_kv

logger = logging.getLogger(__name__)

# (reported name, modules to try, the function used, block sizes its paged kernel takes: multiples of)
# vllm-flash-attn first: it takes the default block size; flash-attn 2 needs --block-size 256.
LIBRARIES = (
    ("vllm-flash-attn", ("vllm_flash_attn", "vllm.vllm_flash_attn"), "flash_attn_varlen_func", 16),
    ("flash-attn", ("flash_attn",), "flash_attn_with_kvcache", 256),
)
DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class FlashLibrary:
    name: str  # flash-attn | vllm-flash-attn: the attention backend's name in Info and the metric
    module: ModuleType
    function: str
    block_multiple: int


def find_library() -> FlashLibrary | None:
    """The first importable library of `LIBRARIES` that has its function, else None."""
    for name, modules, function, multiple in LIBRARIES:
        for module_name in modules:
            try:
                module = importlib.import_module(module_name)
            except Exception:  # absent, or built for another torch/CUDA (an undefined symbol)
                continue
            if callable(getattr(module, function, None)):
                return FlashLibrary(name, module, function, multiple)
    return None


def unusable_reason(library: FlashLibrary, dtype: torch.dtype | None, block_size: int | None) -> str | None:
    """Why `library` cannot serve a model of `dtype` with `block_size`-token blocks; None if it can."""
    if dtype is not None and dtype not in DTYPES:
        return f"{library.name} runs float16 and bfloat16 only, not {str(dtype).removeprefix('torch.')}"
    if block_size is not None and block_size % library.block_multiple:
        return (
            f"{library.name}'s paged kernel needs blocks of a multiple of {library.block_multiple} tokens "
            f"(--block-size {block_size}); run with --block-size {library.block_multiple}"
        )
    return None


def flash_backend(library: FlashLibrary, fallback: AttentionBackend | None = None) -> AttentionBackend:
    attend = _attend_varlen if library.function == "flash_attn_varlen_func" else _attend_with_kvcache
    function = getattr(library.module, library.function)
    return AttentionBackend(library.name, functools.partial(attend, function), store_kv, fallback)


@dataclass(frozen=True)
class _FlashLayout:
    """What every layer's call shares in one step (int32 as the kernels read them)."""

    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    cu_seqlens_k: torch.Tensor  # [num_seqs + 1] int32
    padded_rows: torch.Tensor | None  # flash-attn: each query's row in [num_seqs * max_query_len]


def _layout(meta: AttentionMetadata) -> _FlashLayout:
    layout = meta.derived.get("flash")
    if layout is None:
        device, max_q = meta.seq_lens.device, meta.max_query_len
        seq_lens = meta.seq_lens.to(torch.int32)
        zero = torch.zeros(1, dtype=torch.int32, device=device)
        padded = None
        if any(n != max_q for n in meta.query_lens_host):  # front padding: real rows end each row
            rows = [
                s * max_q + r for s, n in enumerate(meta.query_lens_host) for r in range(max_q - n, max_q)
            ]
            padded = torch.tensor(rows, dtype=torch.int64, device=device)
        layout = meta.derived["flash"] = _FlashLayout(
            block_tables=meta.block_tables.to(torch.int32),
            seq_lens=seq_lens,
            cu_seqlens_q=meta.query_start_loc.to(torch.int32),
            cu_seqlens_k=torch.cat([zero, seq_lens.cumsum(0, dtype=torch.int32)]),
            padded_rows=padded,
        )
    return layout


def _window(sliding_window: int | None) -> tuple[int, int]:
    return (-1, -1) if sliding_window is None else (sliding_window - 1, 0)


def _attend_with_kvcache(
    function: object,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """flash-attn's `flash_attn_with_kvcache` over [num_seqs, max_query_len] front-padded queries."""
    layout = _layout(meta)
    query = query.contiguous()  # the model's may be a view of the fused q/k/v output
    num_seqs, heads, dim = len(meta.seq_lens_host), query.shape[1], query.shape[2]
    if layout.padded_rows is None:
        q = query.view(num_seqs, meta.max_query_len, heads, dim)
    else:
        q = query.new_zeros(num_seqs * meta.max_query_len, heads, dim)
        q[layout.padded_rows] = query
        q = q.view(num_seqs, meta.max_query_len, heads, dim)
    out = function(  # type: ignore[operator]
        q,
        k_cache,
        v_cache,
        cache_seqlens=layout.seq_lens,
        block_table=layout.block_tables,
        softmax_scale=scale,
        causal=True,
        window_size=_window(sliding_window),
        softcap=softcap or 0.0,
    )
    out = out.reshape(-1, heads, dim)
    return out if layout.padded_rows is None else out[layout.padded_rows]


@functools.cache
def _takes_seqused_k(function: object) -> bool:
    """vLLM's current fork reads paged lengths from seqused_k; its older releases from cu_seqlens_k."""
    try:
        return "seqused_k" in inspect.signature(function).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return True


def _attend_varlen(
    function: object,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """vllm-flash-attn's `flash_attn_varlen_func` with a block table over the flattened query rows."""
    layout = _layout(meta)
    lengths = (
        {"seqused_k": layout.seq_lens}
        if _takes_seqused_k(function)
        else {"cu_seqlens_k": layout.cu_seqlens_k}
    )
    return function(  # type: ignore[operator, no-any-return]
        q=query.contiguous(),  # the model's may be a view of the fused q/k/v output
        k=k_cache,
        v=v_cache,
        max_seqlen_q=meta.max_query_len,
        cu_seqlens_q=layout.cu_seqlens_q,
        max_seqlen_k=meta.max_seq_len,
        **lengths,
        softmax_scale=scale,
        causal=True,
        window_size=_window(sliding_window),
        softcap=softcap or 0.0,
        block_table=layout.block_tables,
    )
