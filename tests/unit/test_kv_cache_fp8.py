"""--kv-cache-dtype fp8: K/V stored as e4m3 and attended over dequantized equal plain attention over the
same values rounded to e4m3 (torch's own conversion), for every layout the SDPA path handles."""

from __future__ import annotations

import pytest
import torch
from test_attention import CASES, build_case, dense_attention

from loraxpy.kernels.attention import (
    FP8_KV_DTYPE,
    paged_attention_sdpa_fp8,
    select_attention_backend,
    store_kv_fp8,
)
from loraxpy.worker.kv_cache import KVCacheSpec


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to e4m3 by torch, clamped to its range (±448) first."""
    return x.clamp(-448, 448).to(torch.float8_e4m3fn).float()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("window", [None, 5])
def test_fp8_cache_attention_equals_dense_attention_over_e4m3_values(case: str, window: int | None) -> None:
    query_lens, seq_lens = CASES[case]
    query, k_plain, _, meta, keys, values = build_case(query_lens, seq_lens, heads=6, kv_heads=2)
    keys = [k * 40 for k in keys]  # some past e4m3's 448, clamped
    k_cache = torch.zeros(k_plain.shape, dtype=FP8_KV_DTYPE)
    v_cache = torch.zeros_like(k_cache)
    block_size = k_cache.shape[1]
    for s, (k, v) in enumerate(zip(keys, values, strict=True)):
        positions = torch.arange(k.shape[0])
        slots = meta.block_tables[s, positions // block_size] * block_size + positions % block_size
        store_kv_fp8(k, v, k_cache, v_cache, slots)
    scale = 0.02
    out = paged_attention_sdpa_fp8(query, k_cache, v_cache, meta, scale, window)
    start = 0
    for q_len, k, v in zip(query_lens, keys, values, strict=True):
        expected = dense_attention(query[start : start + q_len], e4m3(k), e4m3(v), q_len, scale, window)
        torch.testing.assert_close(out[start : start + q_len], expected, rtol=1e-5, atol=1e-5)
        start += q_len
    assert not torch.equal(e4m3(keys[0]), keys[0]), "the cache rounds"


def test_padding_slots_store_nothing() -> None:
    k_cache = torch.zeros(2, 4, 1, 8, dtype=FP8_KV_DTYPE)
    v_cache = torch.zeros_like(k_cache)
    x = torch.randn(3, 1, 8)
    store_kv_fp8(x, x, k_cache, v_cache, torch.tensor([5, -1, 2]))
    flat = k_cache.view(-1, 1, 8).float()
    assert torch.equal(flat[5], e4m3(x[0])) and torch.equal(flat[2], e4m3(x[2]))
    assert int((flat.abs().sum(dim=(1, 2)) > 0).sum()) == 2


def test_fp8_cache_holds_four_times_the_fp32_blocks_and_refuses_triton() -> None:
    spec = KVCacheSpec(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    fp8 = KVCacheSpec(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64, dtype=FP8_KV_DTYPE)
    assert fp8.num_blocks_for(1 << 20) == 4 * spec.num_blocks_for(1 << 20)
    cpu = torch.device("cpu")
    assert select_attention_backend(cpu, "auto", "fp8").name == "sdpa-fp8"
    assert select_attention_backend(cpu, "sdpa", "fp8_e4m3fn").name == "sdpa-fp8"
    with pytest.raises(ValueError, match="Triton attention kernels read only the model's dtype"):
        select_attention_backend(cpu, "triton", "fp8")
    with pytest.raises(ValueError, match="--kv-cache-dtype must be one of"):
        select_attention_backend(cpu, "sdpa", "int8")
