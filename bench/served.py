"""The server path of `lorax-bench model`: a real `lorax-launcher` subprocess and batches of /generate.

The launcher (router + one worker shard) serves the model folder on a free loopback port, with the
benchmark's adapters under `--adapter-root`. A batch is B concurrent non-streaming `/generate`
requests sent at once, each with `ignore_eos_token` and `details` (so the response carries every
generated token id); its throughput is all generated tokens / the wall time from the first send to
the last answer, the same measure as the in-process engine's end-to-end tokens/s.

Threads: the launcher gives its worker OMP_NUM_THREADS (the usable cores over the shards) unless
its own environment sets it, so `threads` (when given) overrides that choice; the worker logs the
torch threads it runs with, which `logged_worker_threads` reads back for the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from loraxpy.bench.serving import step_metrics


@dataclass(frozen=True)
class ServerOptions:
    model_dir: Path
    adapter_root: Path
    log_path: Path
    threads: int | None  # the worker's torch threads (OMP_NUM_THREADS); None: the launcher's choice
    max_batch_size: int
    max_adapters: int
    max_lora_rank: int
    prefill_tokens: int
    kv_cache_mib: int
    port: int = 0  # 0: a free port
    dtype: str = "float32"
    startup_timeout_s: float = 600.0
    extra_args: tuple[str, ...] = ()  # more launcher flags

    def command(self, port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "loraxpy.router.launcher",
            *("--hostname", "127.0.0.1", "--port", str(port)),
            *("--model-id", str(self.model_dir), "--dtype", self.dtype),
            *("--adapter-source", "local", "--adapter-root", str(self.adapter_root)),
            *("--max-active-adapters", str(self.max_adapters), "--max-lora-rank", str(self.max_lora_rank)),
            *("--max-concurrent-requests", str(self.max_batch_size)),
            *("--max-batch-prefill-tokens", str(self.prefill_tokens)),
            *("--kv-cache-memory-mib", str(self.kv_cache_mib)),
            *self.extra_args,
        ]

    def env(self) -> dict[str, str]:
        threads = {} if self.threads is None else {"OMP_NUM_THREADS": str(self.threads)}
        return {**os.environ, **threads, "PYTHONUNBUFFERED": "1"}


@dataclass
class BatchResult:
    seconds: float
    tokens_per_s: float
    tokens: list[list[int]]  # generated ids per row
    prompt_tokens: list[int]  # the server's prompt length per row
    step_ms: float | None  # mean step time from /metrics over the batch
    router_overhead_ms: float | None  # the router's own share of each step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def logged_worker_threads(log_path: Path) -> int | None:
    """The CPU threads the worker reported when its model loaded, or None if its log says nothing."""
    found = re.search(r"(\d+) CPU threads", _log_tail(log_path, 1 << 20))
    return int(found.group(1)) if found else None


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], options: ServerOptions) -> None:
    deadline = time.monotonic() + options.startup_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"lorax-launcher exited with {proc.returncode}:\n{_log_tail(options.log_path)}"
            )
        with (
            contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
            urllib.request.urlopen(url + "/health", timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"lorax-launcher was not healthy in time:\n{_log_tail(options.log_path)}")


@contextlib.contextmanager
def launched_server(options: ServerOptions) -> Iterator[str]:
    """Starts the launcher, yields its URL once /health answers, and stops it (SIGTERM, then kill)."""
    port = options.port or free_port()
    url = f"http://127.0.0.1:{port}"
    options.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(options.log_path, "wb") as log:
        proc = subprocess.Popen(
            options.command(port), stdout=log, stderr=subprocess.STDOUT, env=options.env()
        )
        try:
            _wait_healthy(url, proc, options)
            yield url
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


async def _generate(session: aiohttp.ClientSession, url: str, text: str, adapter: str | None, n: int) -> Any:
    params: dict[str, Any] = {"max_new_tokens": n, "ignore_eos_token": True, "details": True}
    if adapter:
        params["adapter_id"] = adapter
    async with session.post(url + "/generate", json={"inputs": text, "parameters": params}) as response:
        body = await response.json()
        if response.status != 200:
            raise RuntimeError(f"/generate answered {response.status}: {body}")
        return body["details"]


async def _batch(url: str, texts: list[str], adapters: list[str | None], new_tokens: int) -> BatchResult:
    timeout = aiohttp.ClientTimeout(total=3600)
    connector = aiohttp.TCPConnector(limit=0)  # every row in flight at once
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        # Untimed warm-up: one short request per distinct adapter loads it into a slot first.
        await asyncio.gather(*(_generate(session, url, texts[0], a, 2) for a in dict.fromkeys(adapters)))
        before = await step_metrics(session, url)
        start = time.perf_counter()
        rows = await asyncio.gather(
            *(_generate(session, url, t, a, new_tokens) for t, a in zip(texts, adapters, strict=True))
        )
        seconds = time.perf_counter() - start
        after = await step_metrics(session, url)
    tokens = [[t["id"] for t in row["tokens"]] for row in rows]
    step_ms = overhead_ms = None
    if before is not None and after is not None and after[0] > before[0]:
        steps = after[0] - before[0]
        step_ms = (after[1] - before[1]) / steps * 1e3
        overhead_ms = (after[2] - before[2]) / steps * 1e3
    return BatchResult(
        seconds=seconds,
        tokens_per_s=sum(len(t) for t in tokens) / seconds,
        tokens=tokens,
        prompt_tokens=[row["prompt_tokens"] for row in rows],
        step_ms=step_ms,
        router_overhead_ms=overhead_ms,
    )


def generate_batch(url: str, texts: list[str], adapters: list[str | None], new_tokens: int) -> BatchResult:
    """Row i sends `texts[i]` with adapter `adapters[i]` (None: the base model); all rows at once."""
    return asyncio.run(_batch(url, texts, adapters, new_tokens))
