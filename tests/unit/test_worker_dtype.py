"""--dtype on CPU: auto is fp32 (exact) whatever the cores; which cores make bf16 fast is detected."""

from __future__ import annotations

import pytest
import torch

from loraxpy.worker.config import WorkerConfig, cpu_native_bf16

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "feature"),
    [(True, True, "AMX"), (False, True, "AVX512-BF16"), (False, False, None)],
)
def test_auto_dtype_on_cpu_is_fp32_and_fast_bf16_is_detected(monkeypatch, amx, avx512_bf16, feature) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert cpu_native_bf16() == feature
    assert WorkerConfig(listen="unix:///x").torch_dtype(CPU) == torch.float32
    for explicit, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        assert WorkerConfig(listen="unix:///x", dtype=explicit).torch_dtype(CPU) == dtype


def test_no_fast_bf16_is_reported_when_torch_lacks_the_probes(monkeypatch) -> None:
    """The probes are torch's private helpers: if a torch release drops them, nothing breaks."""
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert cpu_native_bf16() is None
    assert WorkerConfig(listen="unix:///x").torch_dtype(CPU) == torch.float32
