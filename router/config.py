"""Launcher and router flags with LoRAX's names; each also read from its environment variable, here only."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, fields

from loraxpy.proto.adapter_policy import AdapterPolicy, AdapterSettings
from loraxpy.proto.auth import RefusedOnCommandLine, read_secret
from loraxpy.proto.settings import add_flags, flag_values, not_a_flag
from loraxpy.proto.worker_settings import WorkerSettings


@dataclass(frozen=True)
class RouterConfig(WorkerSettings):
    """Also every flag of the workers (WorkerSettings), which lorax-launcher hands its shards."""

    port: int = 3000
    hostname: str = "0.0.0.0"
    num_shard: int = 1
    max_concurrent_requests: int = 128
    max_input_length: int | None = None  # default: derived from the model (positions - 1)
    max_total_tokens: int | None = None  # default: derived from the model (positions)
    max_batch_prefill_tokens: int = 4096
    max_batch_total_tokens: int | None = None  # default: what the KV cache holds
    # 0: a waiting prompt joins the next step (chunked prefill mixes it into the running decodes).
    # LoRAX's 1.2 holds late arrivals back up to --max-waiting-tokens steps: 16 requests of 32 tokens
    # that reached the router 11 + 5 took 65 steps instead of 34 (CPU, SmolLM2-135M; that run also
    # had the step counter bug that made the wait last until the running requests finished).
    waiting_served_ratio: float = 0.0
    max_waiting_tokens: int = 20
    max_stop_sequences: int = 4
    max_best_of: int = 2
    max_active_adapters: int = 1024
    adapter_cycle_time_s: int = 2
    adapter_source: str = "hub"
    adapter_id: str | None = None  # default adapter for requests that name none
    preloaded_adapter_ids: str | None = None  # comma-separated, loaded at startup
    # Which adapters requests may use, with whose credentials, and the workers' caps on loading
    # them: declared (with their defaults) in proto/adapter_policy.py, handed to every shard.
    allowed_adapter_sources: str = AdapterSettings.allowed_adapter_sources
    allowed_hub_adapters: str = AdapterSettings.allowed_hub_adapters
    allowed_s3_buckets: str = AdapterSettings.allowed_s3_buckets
    max_adapter_size_mib: int = AdapterSettings.max_adapter_size_mib
    adapter_disk_cache_mib: int = AdapterSettings.adapter_disk_cache_mib
    adapter_load_timeout_s: float = AdapterSettings.adapter_load_timeout_s
    max_concurrent_adapter_loads: int = AdapterSettings.max_concurrent_adapter_loads
    # A request waiting longer than this for an adapter slot or its first step gets 503 (0: no limit).
    max_queue_time_s: float = 60.0
    # After SIGTERM: new requests get 503 while running ones have this long to finish.
    shutdown_grace_period_s: float = 10.0
    otlp_endpoint: str | None = None
    json_output: bool = False
    api_key: str | None = None
    # Browser origins allowed to call the API (CORS), as LoRAX's flag: repeated or comma-separated,
    # `*` for any. Unset: no CORS headers, so browsers keep pages of other origins out.
    cors_allow_origin: tuple[str, ...] = ()
    # A client must send a request's body within this many seconds (slow bodies hold connections).
    body_read_timeout_s: float = 30.0
    # An idle connection, or one still sending its headers, is closed after this many seconds.
    keep_alive_timeout_s: float = 75.0
    # Keep full KV blocks after their requests end and reuse them for prompts that start with the
    # same tokens under the same adapter and tenant (LoRAX's flag; `--prefix-caching false` turns it off).
    prefix_caching: bool = True
    # Speculative decoding (LoRAX's flag): each decode step also computes up to this many tokens
    # guessed from the request's own context (prompt lookup) or by its adapter's Medusa heads,
    # verified by the workers; 0: off.
    speculative_tokens: int = 0
    # Overlapped steps: a decode-only step is sent before the step in flight has answered (the
    # workers take each request's input token from their own last sample), so the workers need not
    # wait while the router hands out tokens and schedules.
    overlap_steps: bool = False
    # lorax-launcher: restarts of the whole shard group after a shard dies, at most this many
    # within --restart-window-s; one more and the launcher exits non-zero (0: never restart).
    max_restarts: int = 3
    restart_window_s: float = 600.0
    worker_addresses: str | None = None  # lorax-router only: comma-separated worker addresses
    # lorax-router only (the launcher makes a secret of its own for its shards): the secret every
    # worker RPC carries, from env WORKER_SECRET (no flag: `ps` shows command lines) or this file.
    worker_secret: str | None = not_a_flag(None)
    worker_secret_file: str | None = None
    # lorax-router only: TLS to the workers; the CA that signed their certificates, the router's
    # own certificate and key for mutual TLS, and the name the certificates carry if not the host's.
    worker_tls_ca_file: str | None = None
    worker_tls_cert_file: str | None = None
    worker_tls_key_file: str | None = None
    worker_tls_server_name: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        positive = (
            "port",
            "num_shard",
            "max_concurrent_requests",
            "max_batch_prefill_tokens",
            "max_stop_sequences",
            "max_best_of",
            "max_active_adapters",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        for name in ("max_input_length", "max_total_tokens", "max_batch_total_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.max_input_length and self.max_total_tokens and self.max_input_length >= self.max_total_tokens:
            raise ValueError("--max-input-length must be smaller than --max-total-tokens")
        if self.adapter_source not in ("hub", "local", "s3"):
            raise ValueError("--adapter-source must be hub, local or s3")
        if not 0 <= self.speculative_tokens <= 32:
            raise ValueError("--speculative-tokens must be in [0, 32] (0: off)")
        if not 0 <= self.max_queue_time_s <= 3600 or not 0 <= self.shutdown_grace_period_s <= 3600:
            raise ValueError("--max-queue-time-s and --shutdown-grace-period-s must be in [0, 3600] seconds")
        for name in ("body_read_timeout_s", "keep_alive_timeout_s"):
            if not 0 < getattr(self, name) <= 3600:
                raise ValueError(f"--{name.replace('_', '-')} must be in (0, 3600] seconds")
        if self.max_restarts < 0 or self.restart_window_s <= 0:
            raise ValueError("--max-restarts must be >= 0 and --restart-window-s positive")
        self._check_adapter_policy()
        for origin in self.cors_allow_origin:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"--cors-allow-origin {origin!r}: an origin is * or scheme://host[:port]")
        if (self.worker_tls_cert_file is None) != (self.worker_tls_key_file is None):
            raise ValueError("--worker-tls-cert-file and --worker-tls-key-file go together")

    def adapter_settings(self) -> AdapterSettings:
        return AdapterSettings(**{f.name: getattr(self, f.name) for f in fields(AdapterSettings)})

    def adapter_policy(self) -> AdapterPolicy:
        """Requests use --adapter-source only, unless --allowed-adapter-sources allows more."""
        return self.adapter_settings().policy(self.adapter_source)

    def worker_adapter_args(self) -> list[str]:
        """The adapter flags for this launcher's shards: the same policy, sources pinned as here."""
        sources = ",".join(sorted(self.adapter_policy().sources))
        return dataclasses.replace(self.adapter_settings(), allowed_adapter_sources=sources).to_argv()

    def _check_adapter_policy(self) -> None:
        policy = self.adapter_policy()
        if self.adapter_source not in policy.sources:
            raise ValueError("--adapter-source must be one of --allowed-adapter-sources")
        if "s3" in policy.sources and not policy.s3_buckets:
            # S3 has no per-request credential: every fetch would use the server's own.
            raise ValueError(
                "s3 adapters need --allowed-s3-buckets: the buckets they may come from "
                "(or * for every bucket the server's credentials can read)"
            )

    def __repr__(self) -> str:  # never print the API key or the worker secret
        hidden = ("api_key", "worker_secret")
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in hidden}
        masked = ", ".join(f"{n}={'***' if getattr(self, n) else None}" for n in hidden)
        return f"RouterConfig({shown}, {masked})"


def parse_args(argv: list[str] | None = None, prog: str = "lorax-launcher") -> RouterConfig:
    """Every field is a flag `--field-name`, defaulting to the environment variable FIELD_NAME
    (proto/settings.py); the worker secret is read from WORKER_SECRET or its file only."""
    parser = argparse.ArgumentParser(prog=prog)
    add_flags(parser, RouterConfig)
    parser.add_argument("--worker-secret", action=RefusedOnCommandLine)  # `ps` shows command lines
    args = parser.parse_args(argv)
    secret = read_secret(os.environ.get("WORKER_SECRET"), args.worker_secret_file)
    return RouterConfig(**flag_values(RouterConfig, args), worker_secret=secret)
