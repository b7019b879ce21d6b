"""--dtype auto on CPU: bf16 exactly where the cores multiply bf16 natively (AMX or AVX512-BF16)."""

from __future__ import annotations

import pytest
import torch

from loraxpy.worker.config import WorkerConfig, cpu_native_bf16

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected", "feature"),
    [
        (True, True, torch.bfloat16, "AMX"),
        (False, True, torch.bfloat16, "AVX512-BF16"),
        (False, False, torch.float32, None),
    ],
)
def test_auto_dtype_on_cpu_follows_the_cores(monkeypatch, amx, avx512_bf16, expected, feature) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert cpu_native_bf16() == feature
    assert WorkerConfig(listen="unix:///x").torch_dtype(CPU) == expected
    for explicit, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        assert WorkerConfig(listen="unix:///x", dtype=explicit).torch_dtype(CPU) == dtype


def test_auto_falls_back_to_fp32_when_torch_lacks_the_probes(monkeypatch) -> None:
    """The probes are torch's private helpers: if a torch release drops them, auto serves fp32."""
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert cpu_native_bf16() is None
    assert WorkerConfig(listen="unix:///x").torch_dtype(CPU) == torch.float32
