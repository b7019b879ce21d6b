"""`lorax-launcher` starts the worker shard(s) and serves the router; `lorax-router` serves the router alone.

Startup: spawn shards on unix sockets → wait until they answer → Warmup sizes the KV cache → read
the tokenizer from the model folder → serve HTTP. SIGTERM/SIGINT stop admitting, give in-flight
requests a grace period, stop the shards and exit 0. A shard that dies is healed
(router/healing.py): the launcher restarts the whole shard group (router/shards.py) and serves
again; past --max-restarts within --restart-window-s it exits non-zero naming the shard.
lorax-router heals too: it waits for its workers to come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from loraxpy.proto.auth import channel_credentials, new_secret
from loraxpy.proto.model_task import ModelTask
from loraxpy.proto.settings import to_argv
from loraxpy.proto.worker_settings import WorkerSettings
from loraxpy.router.adapters import AdapterRegistry
from loraxpy.router.config import RouterConfig, parse_args
from loraxpy.router.engine import Engine
from loraxpy.router.grammar import GrammarCompiler
from loraxpy.router.healing import Healer, HealingFailed
from loraxpy.router.kv_blocks import BlockAllocator
from loraxpy.router.logs import configure_logging
from loraxpy.router.metrics import Metrics
from loraxpy.router.scheduler import Scheduler, SchedulerConfig
from loraxpy.router.server import ServerState, build_app
from loraxpy.router.shards import ShardGroup
from loraxpy.router.text import Tokenizer
from loraxpy.router.tracing import Tracer
from loraxpy.router.validation import Limits
from loraxpy.router.worker_client import WorkerClient, WorkerInfo

logger = logging.getLogger("loraxpy.launcher")
MAX_ADAPTER_SLOTS = 128
STARTUP_TIMEOUT_S = 900.0


# The worker's access settings (worker/config.py): the launcher sets its shards' own, none is inherited.
SHARD_ACCESS_ENV = frozenset(
    {"WORKER_SECRET_FILE", "TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE", "ALLOW_UNAUTHENTICATED"}
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def threads_per_shard(num_shard: int) -> int:
    """Each shard's CPU threads: this host's usable cores split evenly, so shards never oversubscribe
    them (torch would give every shard all the cores, and its threads would wait on each other)."""
    return max(1, len(os.sched_getaffinity(0)) // num_shard)


def spawn_shards(
    config: RouterConfig, sock_dir: Path, secret: str
) -> list[tuple[subprocess.Popen[bytes], str]]:
    """One worker process per shard; they meet in a torch.distributed group on this host. Each
    answers only calls carrying `secret`, which it finds in its environment (only this user can
    read it there; `ps` shows command lines to everyone)."""
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    shards = []
    for rank in range(config.num_shard):
        address = f"unix://{sock_dir}/shard-{rank}.sock"
        cmd = [sys.executable, "-m", "loraxpy.worker.cli", "--listen", address]
        cmd += to_argv(config, WorkerSettings)  # every worker setting, as the launcher was given it
        cmd += ["--max-loras", str(adapter_slots(config))]
        cmd += config.worker_adapter_args()
        env = {
            "OMP_NUM_THREADS": str(threads_per_shard(config.num_shard)),  # unless the operator set it
            **{k: v for k, v in os.environ.items() if k not in SHARD_ACCESS_ENV},
            **rendezvous,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(config.num_shard),
            "WORKER_SECRET": secret,
        }
        shards.append((subprocess.Popen(cmd, env=env), address))
    return shards


def adapter_slots(config: RouterConfig) -> int:
    """Slots asked of each shard: --max-active-adapters, capped (16 on CPU, else 128); on CUDA the
    worker lowers it to what --adapter-memory-fraction holds and reports the result in Info."""
    return min(config.max_active_adapters, MAX_ADAPTER_SLOTS)


def derive_limits(config: RouterConfig, info: WorkerInfo, num_blocks: int, model_id: str) -> Limits:
    capacity = num_blocks * info.block_size
    max_total = config.max_total_tokens or min(info.max_position_embeddings, capacity)
    if max_total > capacity:
        raise ValueError(f"--max-total-tokens {max_total} exceeds the KV cache ({capacity} tokens)")
    return Limits(
        max_input_length=config.max_input_length or max_total - 1,
        max_total_tokens=max_total,
        max_stop_sequences=config.max_stop_sequences,
        max_best_of=config.max_best_of,
        default_adapter_source=config.adapter_source,
        base_model_id=model_id,
        default_adapter_id=config.adapter_id,
        vocab_size=info.vocab_size,
        max_concurrent_requests=config.max_concurrent_requests,
    )


async def warm_workers(config: RouterConfig, client: WorkerClient) -> tuple[int, WorkerInfo]:
    """Warmup then Info on every shard (at startup and after healing): the KV blocks to use."""
    num_blocks = await client.warmup(config.max_batch_prefill_tokens, config.max_concurrent_requests)
    info = await client.info()  # after Warmup: its self-check may have switched a fast path to its twin
    if config.max_batch_total_tokens:
        num_blocks = min(num_blocks, -(-config.max_batch_total_tokens // info.block_size))
    return num_blocks, info


def prefix_caching(config: RouterConfig, info: WorkerInfo) -> bool:
    """--prefix-caching, unless the model's K/V of a prefix depend on more than its tokens."""
    if config.prefix_caching and not info.can_reuse_prefixes:
        logger.warning("prefix caching is off: %s's K/V depend on the prompt's length", info.model_type)
    return config.prefix_caching and info.can_reuse_prefixes


def speculative_tokens(config: RouterConfig, info: WorkerInfo) -> int:
    """--speculative-tokens, unless the workers cannot verify guesses (LongRoPE: a guess would move
    the length its table is chosen by)."""
    if config.speculative_tokens and not info.can_reuse_prefixes:
        logger.warning("speculative decoding is off: %s's K/V depend on the prompt's length", info.model_type)
        return 0
    return config.speculative_tokens


def adapter_registry(
    config: RouterConfig, client: WorkerClient, info: WorkerInfo, engine: Engine
) -> AdapterRegistry | None:
    """The adapter slots' registry; None when a shard has no slots (--max-loras 0, or none fit its
    device), so requests naming an adapter are refused at once, not left waiting for a slot."""
    if not info.supports_adapters:
        return None
    return AdapterRegistry(
        client,
        info.num_adapter_slots,
        between_steps=engine.between_steps,
        cycle_time_s=config.adapter_cycle_time_s,
        policy=config.adapter_policy(),
        max_concurrent_loads=config.max_concurrent_adapter_loads,
    )


async def build_state(config: RouterConfig, client: WorkerClient) -> tuple[ServerState, Engine, WorkerInfo]:
    await client.wait_ready(timeout=STARTUP_TIMEOUT_S)
    num_blocks, info = await warm_workers(config, client)
    model_id = config.model_id or info.model_id or "HuggingFaceTB/SmolLM2-135M-Instruct"
    limits = derive_limits(config, info, num_blocks, model_id)
    tokenizer = Tokenizer(Path(info.model_path))
    grammars = GrammarCompiler.for_model(Path(info.model_path), info.vocab_size, info.eos_token_ids)
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_seqs=config.max_concurrent_requests,
            max_step_tokens=config.max_batch_prefill_tokens,
            waiting_served_ratio=config.waiting_served_ratio,
            max_waiting_steps=config.max_waiting_tokens,
            num_speculative_tokens=speculative_tokens(config, info),
        ),
        BlockAllocator(num_blocks, info.block_size, enable_caching=prefix_caching(config, info)),
    )
    metrics = Metrics()
    metrics.set_kernel_paths(info.kernel_paths)
    tracer = Tracer(config.otlp_endpoint)
    engine = Engine(
        client,
        scheduler,
        frozenset(info.eos_token_ids),
        on_step=metrics.observe_step,
        tracer=tracer,
        host_bound=info.device_type == "cpu",
        grammars=grammars,
        overlap_steps=config.overlap_steps,
    )
    info_body: dict[str, Any] = {
        "model_id": model_id,
        "model_dtype": info.dtype,
        "model_device_type": info.device_type,
        "max_concurrent_requests": config.max_concurrent_requests,
        "max_best_of": config.max_best_of,
        "max_stop_sequences": config.max_stop_sequences,
        "max_input_length": limits.max_input_length,
        "max_total_tokens": limits.max_total_tokens,
        "waiting_served_ratio": config.waiting_served_ratio,
        "max_batch_total_tokens": num_blocks * info.block_size,
        "max_waiting_tokens": config.max_waiting_tokens,
        "max_active_adapters": config.max_active_adapters,
        "adapter_cycle_time_s": config.adapter_cycle_time_s,
        "num_shards": info.world_size,
        "quantize": info.quantize or None,
        "weight_bytes_per_shard": list(info.weight_bytes_per_shard),
        "kv_cache_dtype": info.kv_cache_dtype,
        "kv_blocks_freed": info.kv_blocks_freed,
        "kernel_paths": info.kernel_paths,
        "self_check_failures": info.self_check_failures,
        "version": "0.1.0",
        "sha": None,
        "docker_label": None,
    }
    state = ServerState(
        engine,
        tokenizer,
        limits,
        metrics,
        model_id,
        info_body,
        max_concurrent_requests=config.max_concurrent_requests,
        api_key=config.api_key,
        body_read_timeout_s=config.body_read_timeout_s,
        max_queue_time_s=config.max_queue_time_s,
        tracer=tracer,
        task=ModelTask.from_folder(Path(info.model_path)),
        adapters=adapter_registry(config, client, info, engine),
    )
    return state, engine, info


async def serve(
    config: RouterConfig,
    client: WorkerClient,
    shards: ShardGroup | None,
    ready: asyncio.Event | None = None,
) -> int:
    """Serves until SIGTERM/SIGINT (0) or until healing fails (1). `shards`: the launcher's own,
    restarted when one dies; None for lorax-router, which waits for its workers to come back."""
    state, engine, info = await build_state(config, client)
    engine.start()
    await _preload_adapters(config, state)
    restart = None if shards is None else functools.partial(shards.restart, client=client)
    healer = Healer(engine, state.adapters, functools.partial(warm_workers, config, client), info, restart)
    state.metrics.watch_healing(healer, shards)
    healing = asyncio.create_task(healer.run(), name="healer")
    runner = web.AppRunner(
        build_app(state, cors_allow_origin=config.cors_allow_origin),
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=config.keep_alive_timeout_s,
    )
    await runner.setup()
    await web.TCPSite(runner, config.hostname, config.port).start()
    logger.info("serving on http://%s:%d", config.hostname, config.port)
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    failed = await _supervise(stop, shards, healer, healing)
    healing.cancel()
    state.is_draining = True
    if failed is None:
        await _drain(state, config.shutdown_grace_period_s)
    await engine.stop()
    await runner.cleanup()
    state.tracer.shutdown()
    await client.close()
    if failed is not None:
        logger.error("%s; stopping", failed)
        return 1
    return 0


async def _preload_adapters(config: RouterConfig, state: ServerState) -> None:
    ids = [a.strip() for a in (config.preloaded_adapter_ids or "").split(",") if a.strip()]
    if config.adapter_id and config.adapter_id not in ids:
        ids.insert(0, config.adapter_id)
    for adapter_id in ids:
        assert state.adapters is not None
        index = await state.adapters.acquire(adapter_id, config.adapter_source)  # fails startup if broken
        await state.adapters.release(index)


async def _supervise(
    stop: asyncio.Event, shards: ShardGroup | None, healer: Healer, healing: asyncio.Task[None]
) -> str | None:
    """Until SIGTERM/SIGINT, reports a shard that exits to the healer; why to stop if healing failed."""
    while not stop.is_set():
        if healing.done():
            error = healing.exception()
            if not isinstance(error, HealingFailed):
                logger.error("the healer stopped", exc_info=error)
            return str(error)
        if shards is not None and not healer.is_healing:
            dead = shards.first_dead()
            if dead is not None:
                healer.lost(dead)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.5)
    return None


async def _drain(state: ServerState, grace_s: float) -> None:
    """Waits, up to `grace_s`, for the HTTP requests already admitted (new ones get 503 meanwhile);
    what still runs after it is failed when the engine stops."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    logger.info("draining: %d requests running, up to %g s", state.num_admitted, grace_s)
    while (state.num_admitted or state.engine.num_active) and loop.time() < deadline:
        await asyncio.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    try:
        config = parse_args(argv)
    except ValueError as e:
        print(f"lorax-launcher: {e}", file=sys.stderr)
        sys.exit(2)
    configure_logging(config.json_output)
    secret = new_secret()  # this launch's shards answer only to this launcher
    with tempfile.TemporaryDirectory(prefix="lorax-") as sock_dir:  # private to this user (0700)
        shards = ShardGroup(
            functools.partial(spawn_shards, config, Path(sock_dir), secret),
            config.max_restarts,
            config.restart_window_s,
        )
        shards.start()
        try:
            code = asyncio.run(_serve_or_fail(config, shards, secret))
        finally:
            shards.stop()
    sys.exit(code)


async def _serve_or_fail(config: RouterConfig, shards: ShardGroup, secret: str) -> int:
    """Fails fast when a shard dies during startup instead of waiting out the startup timeout."""
    client = WorkerClient(shards.addresses, secret=secret)  # gRPC aio channels belong to the running loop
    ready = asyncio.Event()
    serving = asyncio.ensure_future(serve(config, client, shards, ready))
    while not serving.done() and not ready.is_set():
        dead = shards.first_dead()
        if dead is not None and not serving.done():
            serving.cancel()
            logger.error("%s during startup", dead)
            return 1
        await asyncio.wait([serving], timeout=0.5)
    return await serving


def router_main(argv: list[str] | None = None) -> None:
    """`lorax-router --worker-addresses unix:///a.sock,host:port`: the router alone (separate worker pods)."""
    try:
        config = parse_args(argv, prog="lorax-router")
    except ValueError as e:
        print(f"lorax-router: {e}", file=sys.stderr)
        sys.exit(2)
    configure_logging(config.json_output)
    if not config.worker_addresses:
        print("lorax-router: --worker-addresses is required", file=sys.stderr)
        sys.exit(2)
    addresses = config.worker_addresses.split(",")
    if config.worker_secret is None and config.worker_tls_cert_file is None:
        logger.warning(
            "no WORKER_SECRET and no client certificate: workers that require one refuse every call"
        )

    async def run() -> int:
        return await serve(config, worker_client(config, addresses), None)

    sys.exit(asyncio.run(run()))


def worker_client(config: RouterConfig, addresses: list[str]) -> WorkerClient:
    """lorax-router's client for separately started workers: their secret, and TLS if configured."""
    tls = None
    if config.worker_tls_ca_file or config.worker_tls_cert_file:
        tls = channel_credentials(
            config.worker_tls_ca_file, config.worker_tls_cert_file, config.worker_tls_key_file
        )
    return WorkerClient(
        addresses, secret=config.worker_secret, tls=tls, tls_server_name=config.worker_tls_server_name
    )


if __name__ == "__main__":
    main()
