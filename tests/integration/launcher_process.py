"""Starts a real `lorax-launcher` (router + worker shards) for tests and waits until it serves."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Launcher:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def launcher(
    model_path: Path | str | None,
    log_dir: Path,
    *args: str,
    timeout_s: float = 300,
    env: dict[str, str] | None = None,
) -> Iterator[Launcher]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "loraxpy.router.launcher",
        "--hostname",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--kv-cache-memory-mib",
        "256",
        "--max-batch-prefill-tokens",
        "512",
        *args,
    ]
    if model_path is not None:
        cmd += ["--model-id", str(model_path)]
    log_path = log_dir / f"launcher-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        )
        handle = Launcher(f"http://127.0.0.1:{port}", proc, log_path)
        try:
            _wait_healthy(handle, timeout_s)
            yield handle
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _wait_healthy(handle: Launcher, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if handle.proc.poll() is not None:
            raise RuntimeError(f"launcher exited with {handle.proc.returncode}:\n{handle.log()}")
        try:
            if requests.get(handle.url + "/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"launcher did not become healthy:\n{handle.log()}")
