"""`lorax-worker`: resolves the model, loads one shard and serves the Worker gRPC service until signalled."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import grpc
import torch

from loraxpy.proto.auth import server_credentials
from loraxpy.worker import threads
from loraxpy.worker.config import WorkerConfig, cpu_native_bf16, parse_args
from loraxpy.worker.distributed import init_distributed
from loraxpy.worker.encoder import EncoderRunner, is_encoder_folder
from loraxpy.worker.layers import Shard
from loraxpy.worker.model_source import ModelSourceError, resolve_model
from loraxpy.worker.runner import ModelRunner, RunnerOptions
from loraxpy.worker.server import WorkerServicer, serve

logger = logging.getLogger("loraxpy.worker")


# oneDNN kernels (the packed CPU linears, bf16 matmuls) are compiled for each input shape and kept
# in two caches, PyTorch's (LRU_CACHE_CAPACITY) and oneDNN's (ONEDNN_PRIMITIVE_CACHE_CAPACITY), of
# 1024 entries each by default, 200-300 KiB an entry. Every new number of tokens in a step was a new
# shape, so a long-running server grew by hundreds of MiB until both were full (the soak's worker
# memory growth). The packed linears now meet a bounded set of row counts (worker/prepacked.py:
# 4-32 rows in fp32, eight padded sizes per doubling above 32 in bf16), about 150 shapes for the
# default model in fp32 and 500 in bf16; 512 entries each hold them, so decode steps do not wait for
# a kernel to be compiled again (1.7-3.7 ms a linear, against 0.2 ms cached; 64 entries would not
# even hold the fp32 decode sizes, 29 row counts x 5 linears), while a worst case stays near 300 MiB.
# Read at the first oneDNN call.
ONEDNN_CACHE_ENTRIES = "512"


def bound_onednn_caches() -> None:
    """Caps both oneDNN kernel caches, unless the environment sizes them itself."""
    for name in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        os.environ.setdefault(name, ONEDNN_CACHE_ENTRIES)


def build_runner(config: WorkerConfig) -> ModelRunner:
    model_path = resolve_model(
        config.model_id,
        cache_dir=config.cache_dir,
        revision=config.revision,
        api_token=config.hub_token,
        hub_cache_dir=config.hub_cache_dir,
        offline=config.offline,
    )
    device = config.torch_device()
    init_distributed(config.rank, config.world_size, device)
    dtype = config.torch_dtype(device)
    if device.type == "cpu":
        feature = cpu_native_bf16()
        if dtype == torch.float32 and feature:
            logger.info("this CPU has %s: --dtype bfloat16 runs about 2x faster (not bit-exact)", feature)
        elif dtype == torch.bfloat16 and not feature:
            logger.warning("--dtype bfloat16 on a CPU without AMX or AVX512-BF16: emulated, slower than fp32")
    options = RunnerOptions.of_settings(config, dtype, device, shard=Shard(config.rank, config.world_size))
    return (EncoderRunner if is_encoder_folder(model_path) else ModelRunner)(model_path, options)


def tls(config: WorkerConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    return server_credentials(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)


def warn_about_access(config: WorkerConfig) -> None:
    """Says loudly when the port is open to anyone, or when secrets cross the network in clear text."""
    if not config.is_tcp:
        return
    if config.worker_secret is None and config.tls_client_ca_file is None:
        logger.warning(
            "--allow-unauthenticated: anyone who reaches %s can load adapters with this worker's "
            "credentials, read and overwrite other requests' KV cache, and wipe it with Warmup",
            config.listen,
        )
    if config.tls_cert_file is None:
        logger.warning(
            "%s serves without TLS: the worker secret and tenants' adapter api_tokens cross the "
            "network in clear text (set --tls-cert-file/--tls-key-file, or keep the port on a "
            "network only the router reaches)",
            config.listen,
        )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bound_onednn_caches()
    try:
        config = parse_args(argv)
        model_thread = threads.model_thread()  # loads the model, then runs every step (worker/threads.py)
        runner = model_thread.submit(build_runner, config).result()
    except (ValueError, ModelSourceError) as e:
        logger.error("%s", e)
        sys.exit(2)
    warn_about_access(config)
    servicer = WorkerServicer(runner, config.model_id, model_thread=model_thread)
    server = serve(servicer, config.listen, config.worker_secret, tls(config))
    logger.info("worker rank %d/%d listening on %s", config.rank, config.world_size, config.listen)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    logger.info("shutting down")
    server.stop(grace=5).wait()


if __name__ == "__main__":
    main()
