"""The worker's configuration: flags map 1:1 to fields (declared with proto/settings.py); this is the
only worker module reading env vars."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from loraxpy.proto.adapter_policy import AdapterSettings
from loraxpy.proto.auth import RefusedOnCommandLine, read_secret
from loraxpy.proto.settings import add_flags, flag_values, not_a_flag, setting
from loraxpy.proto.worker_settings import WorkerSettings

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # DTYPE_NAMES


@dataclass(frozen=True)
class WorkerConfig(WorkerSettings):
    """The shard's settings (WorkerSettings, also lorax-launcher's flags), and the worker's own."""

    listen: str = setting("", env="LORAX_WORKER_LISTEN", help="unix:///path/to.sock or host:port")
    device: str = setting("auto", env="LORAX_DEVICE", help="auto, cpu, cuda or cuda:N")
    max_loras: int = setting(8, help="adapter slots on the device")
    # Read from the environment by parse_args (the launcher and torch.distributed's env:// set them).
    cache_dir: Path = not_a_flag(default_factory=lambda: Path("~/.cache/loraxpy").expanduser())
    hub_cache_dir: Path | None = not_a_flag(None)
    hub_token: str | None = not_a_flag(None)
    offline: bool = not_a_flag(False)
    rank: int = not_a_flag(0)
    world_size: int = not_a_flag(1)
    local_rank: int = not_a_flag(0)
    adapter_settings: AdapterSettings = not_a_flag(default_factory=AdapterSettings)  # proto/adapter_policy.py
    # Who may call this worker (proto/auth.py): the shared secret every RPC must carry, and TLS
    # (their flags: _add_access_flags).
    worker_secret: str | None = not_a_flag(None)
    tls_cert_file: Path | None = not_a_flag(None)
    tls_key_file: Path | None = not_a_flag(None)
    # Set: mutual TLS, clients need a certificate it signed.
    tls_client_ca_file: Path | None = not_a_flag(None)
    allow_unauthenticated: bool = not_a_flag(False)

    def __post_init__(self) -> None:
        super().__post_init__()  # the shard's settings
        check_device(self.device)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RANK {self.rank} must lie in [0, WORLD_SIZE={self.world_size})")
        if self.max_loras < 0:
            raise ValueError("--max-loras must be >= 0")
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
        return torch_device(self.device, self.local_rank)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        return torch_dtype(self.dtype, device)


def check_device(name: str) -> None:
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")


def torch_device(name: str, local_rank: int = 0) -> torch.device:
    """--device (the worker's and lorax-bench's): CUDA is detected once, here; everything else
    receives the device explicitly."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(name)


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype on `device` (the worker's and lorax-bench's): auto is bf16 (fp16 without it) on CUDA;
    fp32 on CPU, even where bf16 is fast (see `cpu_native_bf16`): the default model's greedy answers
    change in bf16 (the README's capital of France becomes Barcelona), so there it is the operator's
    choice, logged at startup."""
    if name != "auto":
        return DTYPES[name]
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
    add_flags(p, WorkerConfig)  # WorkerSettings' and the worker's own flags (proto/settings.py)
    _add_access_flags(p)
    AdapterSettings.add_arguments(p)  # which adapters requests may use; size, disk and load caps
    args = p.parse_args(argv)
    hub_cache = env.get("HF_HUB_CACHE")
    return WorkerConfig(
        **flag_values(WorkerConfig, args),
        cache_dir=Path(env.get("LORAX_CACHE", "~/.cache/loraxpy")).expanduser(),
        hub_cache_dir=Path(hub_cache).expanduser() if hub_cache else None,
        hub_token=env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or None,
        offline=_env_flag("HF_HUB_OFFLINE"),
        rank=int(env.get("RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", env.get("RANK", 0))),
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
