"""The worker's configuration: CLI flags map 1:1 to fields; this is the only worker module reading env vars."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraxpy.kernels.attention import ATTENTION_BACKENDS
from loraxpy.proto.adapter_policy import AdapterSettings
from loraxpy.proto.auth import RefusedOnCommandLine, read_secret
from loraxpy.proto.quantization import SCHEMES, check_scheme_name
from loraxpy.worker.prepacked import LAYOUTS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class WorkerConfig:
    listen: str
    model_id: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    kv_cache_memory_mib: int = 1024
    gpu_memory_utilization: float = 0.9
    cache_dir: Path = field(default_factory=lambda: Path("~/.cache/loraxpy").expanduser())
    hub_cache_dir: Path | None = None
    hub_token: str | None = None
    offline: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    max_loras: int = 8
    max_lora_rank: int = 64
    adapter_root: Path | None = None
    adapter_host_cache_mib: int = 4096
    adapter_memory_fraction: float = 0.1
    attention_backend: str = "auto"
    cpu_weight_layout: str = "auto"  # CPU: linears packed once for oneDNN (worker/prepacked.py), or plain
    cuda_graph_max_batch_size: int = 0
    quantize: str | None = None  # LoRAX's --quantize names (proto/quantization.py)
    adapter_settings: AdapterSettings = field(default_factory=AdapterSettings)  # proto/adapter_policy.py
    # Who may call this worker (proto/auth.py): the shared secret every RPC must carry, and TLS.
    worker_secret: str | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None  # set: mutual TLS, clients need a certificate it signed
    allow_unauthenticated: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"--attention-backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}"
            )
        check_scheme_name(self.quantize)
        if self.cuda_graph_max_batch_size < 0:
            raise ValueError("--cuda-graph-max-batch-size must be >= 0 (0: off)")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"--block-size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory_mib < 1:
            raise ValueError("--kv-cache-memory-mib must be positive")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("--gpu-memory-utilization must be in (0, 1]")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RANK {self.rank} must lie in [0, WORLD_SIZE={self.world_size})")
        if self.max_loras < 0 or self.max_lora_rank < 1:
            raise ValueError("--max-loras must be >= 0 and --max-lora-rank >= 1")
        if not 0 < self.adapter_memory_fraction <= 1:
            raise ValueError("--adapter-memory-fraction must be in (0, 1]")
        if self.adapter_host_cache_mib < 0:
            raise ValueError("--adapter-host-cache-mib must be >= 0")
        if not self.listen:
            raise ValueError("--listen needs an address: unix:///path/to.sock or host:port")
        self._check_access()

    def _check_access(self) -> None:
        """A TCP port is reachable by anything on the network, and a caller of the Worker service can
        load adapters with the server's credentials and write any request's KV blocks: unless the
        operator says otherwise, it must be guarded by the secret or by client certificates."""
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("--tls-cert-file and --tls-key-file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("--tls-client-ca-file needs --tls-cert-file and --tls-key-file")
        is_guarded = self.worker_secret is not None or self.tls_client_ca_file is not None
        if self.is_tcp and not is_guarded and not self.allow_unauthenticated:
            raise ValueError(
                f"refusing to serve {self.listen} to anyone who can reach it: set WORKER_SECRET (or "
                "--worker-secret-file, or --tls-client-ca-file for client certificates), or pass "
                "--allow-unauthenticated on a network only the router can reach"
            )

    @property
    def is_tcp(self) -> bool:
        return not self.listen.startswith("unix:")

    def __repr__(self) -> str:  # never print the token or the secret
        hidden = ("hub_token", "worker_secret")
        fields = {k: ("***" if v else None) if k in hidden else v for k, v in self.__dict__.items()}
        return f"WorkerConfig({fields})"

    def torch_device(self) -> torch.device:
        """CUDA is detected once, here; everything else receives the device explicitly."""
        if self.device == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda", self.local_rank % torch.cuda.device_count())
            return torch.device("cpu")
        return torch.device(self.device)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        """--dtype auto: bf16 (fp16 without it) on CUDA; fp32 on CPU, even where bf16 is fast (see
        `cpu_native_bf16`): the default model's greedy answers change in bf16 (the README's capital of
        France becomes Barcelona), so there it is the operator's choice, logged at startup."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32


def cpu_native_bf16() -> str | None:
    """The CPU feature that makes bf16 matmuls fast here (AMX or AVX512-BF16), or None.

    Measured on this project's AVX512-BF16 machine (2 cores, torch 2.13): a decode step's linears at
    batch 16 run 2.3x faster in bf16 than in fp32 and no slower at batch 1. Without these units
    torch emulates bf16 and fp32 is the faster choice.
    """
    cpu = getattr(torch, "cpu", None)
    for feature, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")):
        check = getattr(cpu, probe, None)
        if check is not None and check():
            return feature
    return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def parse_args(argv: list[str] | None = None) -> WorkerConfig:
    env = os.environ
    p = argparse.ArgumentParser(prog="lorax-worker", description="Serve one model shard over gRPC.")
    p.add_argument(
        "--listen",
        default=env.get("LORAX_WORKER_LISTEN", ""),
        help="unix:///path/to.sock or host:port (env LORAX_WORKER_LISTEN)",
    )
    p.add_argument(
        "--model-id",
        default=env.get("MODEL_ID") or None,
        help="local folder or hub id; default: the packaged SmolLM2-135M-Instruct (env MODEL_ID)",
    )
    p.add_argument("--revision", default=env.get("REVISION") or None, help="hub revision (env REVISION)")
    p.add_argument("--dtype", default=env.get("DTYPE", "auto"), help="auto, float32, float16 or bfloat16")
    p.add_argument("--device", default=env.get("LORAX_DEVICE", "auto"), help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--attention-backend",
        default=env.get("ATTENTION_BACKEND", "auto"),
        help="auto (Triton on CUDA, SDPA on CPU), sdpa or triton (env ATTENTION_BACKEND)",
    )
    p.add_argument(
        "--cpu-weight-layout",
        choices=LAYOUTS,
        default=env.get("CPU_WEIGHT_LAYOUT", "auto"),
        help="CPU workers: linears packed once into oneDNN's layout (packed; auto: where it works) "
        "or multiplied as stored (plain) (env CPU_WEIGHT_LAYOUT)",
    )
    p.add_argument(
        "--cuda-graph-max-batch-size",
        type=int,
        default=int(env.get("CUDA_GRAPH_MAX_BATCH_SIZE", 0)),
        help="decode steps of up to this many requests replay CUDA graphs captured at warmup; 0: off "
        "(env CUDA_GRAPH_MAX_BATCH_SIZE)",
    )
    p.add_argument(
        "--quantize",
        default=env.get("QUANTIZE") or None,
        help=f"quantize the base model's linears at load: {', '.join(n for n, why in SCHEMES.items() if why is None)}; "
        "adapters stay in full precision (env QUANTIZE)",
    )
    p.add_argument(
        "--block-size", type=int, default=int(env.get("BLOCK_SIZE", 16)), help="tokens per KV block"
    )
    p.add_argument(
        "--kv-cache-memory-mib",
        type=int,
        default=int(env.get("KV_CACHE_MEMORY_MIB", 1024)),
        help="KV cache size on CPU, in MiB",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=float(env.get("GPU_MEMORY_UTILIZATION", 0.9)),
        help="fraction of GPU memory for weights, activations and KV cache",
    )
    p.add_argument(
        "--max-loras",
        type=int,
        default=int(env.get("MAX_LORAS", 8)),
        help="adapter slots on the device (env MAX_LORAS)",
    )
    p.add_argument(
        "--max-lora-rank",
        type=int,
        default=int(env.get("MAX_LORA_RANK", 64)),
        help="largest adapter rank (env MAX_LORA_RANK)",
    )
    p.add_argument(
        "--adapter-root",
        default=env.get("ADAPTER_ROOT") or None,
        help="folder local adapters must lie in; unset: local adapters are refused (env ADAPTER_ROOT)",
    )
    p.add_argument(
        "--adapter-memory-fraction",
        type=float,
        default=float(env.get("ADAPTER_MEMORY_FRACTION", 0.1)),
        help="CUDA: share of device memory for adapter slots; fewer slots than --max-loras if they do not fit",
    )
    p.add_argument(
        "--adapter-host-cache-mib",
        type=int,
        default=int(env.get("ADAPTER_HOST_CACHE_MIB", 4096)),
        help="host memory for adapters that left the device or were merged, LRU (env ADAPTER_HOST_CACHE_MIB)",
    )
    _add_access_flags(p)
    AdapterSettings.add_arguments(p)  # which adapters requests may use; size, disk and load caps
    args = p.parse_args(argv)
    hub_cache = env.get("HF_HUB_CACHE")
    return WorkerConfig(
        listen=args.listen,
        model_id=args.model_id,
        revision=args.revision,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        kv_cache_memory_mib=args.kv_cache_memory_mib,
        gpu_memory_utilization=args.gpu_memory_utilization,
        cache_dir=Path(env.get("LORAX_CACHE", "~/.cache/loraxpy")).expanduser(),
        hub_cache_dir=Path(hub_cache).expanduser() if hub_cache else None,
        hub_token=env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or None,
        offline=_env_flag("HF_HUB_OFFLINE"),
        rank=int(env.get("RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", env.get("RANK", 0))),
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        adapter_root=Path(args.adapter_root).expanduser() if args.adapter_root else None,
        adapter_host_cache_mib=args.adapter_host_cache_mib,
        adapter_memory_fraction=args.adapter_memory_fraction,
        attention_backend=args.attention_backend,
        cpu_weight_layout=args.cpu_weight_layout,
        cuda_graph_max_batch_size=args.cuda_graph_max_batch_size,
        quantize=args.quantize,
        adapter_settings=AdapterSettings.from_args(args),
        worker_secret=read_secret(env.get("WORKER_SECRET"), args.worker_secret_file),
        tls_cert_file=_path(args.tls_cert_file),
        tls_key_file=_path(args.tls_key_file),
        tls_client_ca_file=_path(args.tls_client_ca_file),
        allow_unauthenticated=args.allow_unauthenticated,
    )


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


def _add_access_flags(p: argparse.ArgumentParser) -> None:
    """The secret itself has no flag: command lines are visible to every user of the host (`ps`)."""
    env = os.environ
    p.add_argument("--worker-secret", action=RefusedOnCommandLine)
    p.add_argument(
        "--worker-secret-file",
        default=env.get("WORKER_SECRET_FILE") or None,
        help="file holding the secret every RPC must carry (or the secret itself in env WORKER_SECRET)",
    )
    p.add_argument(
        "--tls-cert-file", default=env.get("TLS_CERT_FILE") or None, help="PEM certificate: serve TLS"
    )
    p.add_argument(
        "--tls-key-file", default=env.get("TLS_KEY_FILE") or None, help="PEM key of the certificate"
    )
    p.add_argument(
        "--tls-client-ca-file",
        default=env.get("TLS_CLIENT_CA_FILE") or None,
        help="PEM CA: only clients with a certificate it signed may connect (mutual TLS)",
    )
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        default=_env_flag("ALLOW_UNAUTHENTICATED"),
        help="serve a TCP port without a secret or client certificates (env ALLOW_UNAUTHENTICATED)",
    )
