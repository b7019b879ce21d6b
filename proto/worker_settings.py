"""The model shard's settings: flags of lorax-worker, and of lorax-launcher, which hands each of them
to its shards as they are (`to_argv`). Declared once here, torch-free, so the launcher checks them
before any shard starts; lorax-router accepts them too (its workers are started by others).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraxpy.proto.quantization import PREQUANTIZED, SCHEMES, check_scheme_name
from loraxpy.proto.settings import setting

DTYPE_NAMES = ("float32", "float16", "bfloat16")
ATTENTION_BACKEND_NAMES = ("auto", "sdpa", "triton", "flash")  # kernels/attention.py's ATTENTION_BACKENDS
CPU_WEIGHT_LAYOUTS = ("auto", "packed", "plain")  # worker/prepacked.py's LAYOUTS
KV_CACHE_DTYPE_NAMES = ("auto", "fp8", "fp8_e4m3fn")  # kernels/attention.py's KV_CACHE_DTYPES


@dataclass(frozen=True)
class WorkerSettings:
    model_id: str | None = setting(
        None, help="local folder or hub id; default: the packaged SmolLM2-135M-Instruct"
    )
    revision: str | None = setting(None, help="hub revision")
    dtype: str = setting("auto", help="auto, float32, float16 or bfloat16")
    attention_backend: str = setting(
        "auto",
        help="auto (CUDA: flash-attn / vllm-flash-attn where installed, else Triton; SDPA on CPU), sdpa, "
        "triton or flash",
    )
    cpu_weight_layout: str = setting(
        "auto",
        choices=CPU_WEIGHT_LAYOUTS,
        help="CPU workers: linears packed once into oneDNN's layout (packed; auto: where it works, "
        "keeping fp32's plain weights for the step sizes they multiply faster, timed at load) or "
        "multiplied as stored (plain)",
    )
    cuda_graph_max_batch_size: int = setting(
        0, help="decode steps of up to this many requests replay CUDA graphs captured at warmup; 0: off"
    )
    quantize: str | None = setting(
        None,
        help="quantize the base model's linears at load: "
        f"{', '.join(n for n, why in SCHEMES.items() if why is None and n not in PREQUANTIZED)}; or read a "
        f"checkpoint stored quantized: {', '.join(PREQUANTIZED)}, and fp8 from compressed-tensors; "
        "adapters stay in full precision",
    )
    kv_cache_dtype: str = setting(
        "auto",
        choices=KV_CACHE_DTYPE_NAMES,
        help="KV cache element type: auto (the model's dtype) or fp8 (e4m3, one scale per cache tensor; "
        "SDPA attention only): more KV blocks in the same memory",
    )
    block_size: int = setting(16, help="tokens per KV block")
    kv_cache_memory_mib: int = setting(1024, help="KV cache size on CPU, in MiB")
    gpu_memory_utilization: float = setting(
        0.9, help="fraction of GPU memory for weights, activations and KV cache"
    )
    max_lora_rank: int = setting(64, help="largest adapter rank")
    adapter_root: Path | None = setting(
        None, help="folder local adapters must lie in; unset: local adapters are refused"
    )
    adapter_memory_fraction: float = setting(
        0.1,
        help="CUDA: share of device memory for adapter slots; fewer slots than --max-loras if they do not fit",
    )
    adapter_host_cache_mib: int = setting(
        4096, help="host memory for adapters that left the device or were merged, LRU"
    )

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *DTYPE_NAMES):
            raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.attention_backend not in ATTENTION_BACKEND_NAMES:
            raise ValueError(
                f"--attention-backend must be one of {', '.join(ATTENTION_BACKEND_NAMES)}, "
                f"got {self.attention_backend!r}"
            )
        if self.cpu_weight_layout not in CPU_WEIGHT_LAYOUTS:
            raise ValueError(f"--cpu-weight-layout must be one of {', '.join(CPU_WEIGHT_LAYOUTS)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPE_NAMES:
            raise ValueError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPE_NAMES)}")
        if self.kv_cache_dtype != "auto" and self.attention_backend in ("triton", "flash"):
            raise ValueError(
                "--kv-cache-dtype fp8 runs on the SDPA attention; the Triton and flash attention kernels read "
                "only the model's dtype: use --attention-backend sdpa or auto"
            )
        check_scheme_name(self.quantize)  # before any shard starts
        if self.cuda_graph_max_batch_size < 0:
            raise ValueError("--cuda-graph-max-batch-size must be >= 0 (0: off)")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"--block-size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory_mib < 1:
            raise ValueError("--kv-cache-memory-mib must be positive")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("--gpu-memory-utilization must be in (0, 1]")
        if self.max_lora_rank < 1:
            raise ValueError("--max-lora-rank must be >= 1")
        if not 0 < self.adapter_memory_fraction <= 1:
            raise ValueError("--adapter-memory-fraction must be in (0, 1]")
        if self.adapter_host_cache_mib < 0:
            raise ValueError("--adapter-host-cache-mib must be >= 0")
