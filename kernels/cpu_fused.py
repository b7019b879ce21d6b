"""Fused CPU ops for the decode step, compiled once from `cpu_fused.cpp`, each with its torch twin.

Why C++: on CPU a decode step of a small model is ~3,000 torch ops, and after each layer's linears
have streamed their weights through the caches every small op (a norm's pow, mean, rsqrt, two muls;
rotary's muls, neg and cat; the K/V gathers for SDPA) runs cold, at 20-100 us each (measured on this
project's 2-core Xeon: a [16, 576] RMSNorm takes 20 us in a hot loop, 110-135 us right after a
linear). Nothing on PyPI ships these ops for current torch on CPU (Intel's extension stopped at
torch 2.8; vLLM's CPU kernels are not a separate package), and `torch.compile` of the same pieces
was slower here (README, "Performance on CPU"). So small kernels, one call each per layer or step:

- `add_rms_norm`: the residual add and the RMSNorm after it (Llama's and Gemma's rounding);
- `silu_and_mul`: the MLP's activation;
- `rotary_store`: rotary on q and k in place in the qkv projection's output, K and V into the paged
  caches;
- `decode_attention`: one query per sequence over its paged K/V, no gather; each sequence's K/V
  rows read once for all its heads when there are enough sequences to share out;
- `lora_rows`: LoRA for decode-sized steps from each row's own slot (worker/lora.py);
- `greedy_logsumexp`: a plain greedy batch's argmax and logsumexp in two passes over each row of
  logits, instead of torch's argmax plus logsumexp's five (worker/sampling.py).
- `int4_linear` (`cpu_int4.cpp`): x W^T with W kept 4 bits a value (GPTQ / AWQ checkpoints, GGUF's
  Q4_0 / Q4_1 blocks), expanded 16 output columns at a time instead of whole at every call.

The extension is built with torch's own toolchain (`torch.utils.cpp_extension`, ninja, the system's
C++ compiler) on first use into `$LORAX_KERNEL_CACHE` (default `~/.cache/loraxpy/torch_extensions`;
about 40 s on 2 cores; `make install` builds it), keyed by a hash of the source, flags and torch
version and the CPU's model and flags, so a changed source rebuilds and code built with
`-march=native` never loads on another CPU (the images build it on first start, on the node). Any failure to
build or load leaves the torch twins in place with one warning: CPU always works.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import IO

import torch

logger = logging.getLogger(__name__)

SOURCES = (Path(__file__).with_name("cpu_fused.cpp"), Path(__file__).with_name("cpu_int4.cpp"))
# -ffp-contract=off: no fused multiply-adds, so each product and sum rounds as the torch twin's ops do.
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp")
DISABLE_ENV = "LORAX_CPU_FUSED"  # "0": never build or use the fused ops
# How long a loader waits for another process's build of the same ops (a first build takes about a
# minute on 2 cores) before it gives up and uses the torch twins: a build that hangs, or a process
# stopped mid-build, must not keep a worker from starting.
BUILD_WAIT_ENV = "LORAX_KERNEL_BUILD_WAIT_S"
BUILD_WAIT_S = 600.0
FusedOps = ModuleType  # the compiled module: add_rms_norm, silu_and_mul, rotary_store, decode_attention

_lock = threading.Lock()
_state: dict[str, ModuleType | str | None] = {}


def build_dir() -> Path:
    return Path(os.environ.get("LORAX_KERNEL_CACHE", "~/.cache/loraxpy/torch_extensions")).expanduser()


def _cpu_identity() -> bytes:
    """The CPU's model and feature flags: -march=native code must never load on another CPU (a
    kernel cache on a volume shared by different nodes)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform

        return platform.processor().encode()
    wanted = ("model name", "flags")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted})).encode()


def _name() -> str:
    digest = hashlib.sha256(
        b"".join(source.read_bytes() for source in SOURCES)
        + " ".join(CFLAGS).encode()
        + torch.__version__.encode()
        + _cpu_identity()
    )
    return f"loraxpy_cpu_fused_{digest.hexdigest()[:12]}"


def load() -> ModuleType | None:
    """The compiled ops, building them on first use; None (and one warning) when they cannot be."""
    with _lock:
        if "module" in _state:
            module = _state["module"]
            return module if isinstance(module, ModuleType) else None
        _state["module"] = None
        if os.environ.get(DISABLE_ENV, "1") == "0":
            _state["why"] = f"{DISABLE_ENV}=0"
            return None
        try:
            from torch.utils import cpp_extension

            directory = build_dir() / _name()
            directory.mkdir(parents=True, exist_ok=True)
            # Compiled from a copy in the build directory (named by the source's hash): ninja keys its
            # rebuilds on the source's path, so two checkouts sharing the cache would rebuild in turn.
            for original in SOURCES:
                source = directory / original.name
                if not source.exists():
                    tmp = source.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_bytes(original.read_bytes())
                    tmp.replace(source)
            # One build at a time under an flock, which the OS releases if the process dies; torch's
            # own lock file is a plain file that a killed build leaves behind, after which every
            # later load would wait for it forever. Under the flock no live loader holds it: drop it.
            with open(directory / "loraxpy.flock", "w") as held:
                _wait_for_build_lock(held, float(os.environ.get(BUILD_WAIT_ENV, BUILD_WAIT_S)))
                (directory / "lock").unlink(missing_ok=True)
                module = cpp_extension.load(
                    name=_name(),
                    sources=[str(directory / original.name) for original in SOURCES],
                    extra_cflags=list(CFLAGS),
                    extra_ldflags=["-fopenmp"],
                    build_directory=str(directory),
                    verbose=False,
                )
        except Exception as exc:  # any build or load failure keeps the torch twins
            _state["why"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc) else ''}"
            logger.warning("fused CPU ops unavailable, using their torch twins: %s", _state["why"])
            return None
        _state["module"] = module
        return module


def _wait_for_build_lock(held: IO[str], wait_s: float) -> None:
    """Takes the build's flock, waiting at most `wait_s` for another process that holds it (saying
    so every 30 s); TimeoutError after that."""
    deadline = time.monotonic() + wait_s
    next_note = time.monotonic() + 30.0
    while True:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(
                    f"another process has been building the fused CPU ops for over {wait_s:.0f} s "
                    f"({BUILD_WAIT_ENV} sets the wait)"
                ) from None
            if now >= next_note:
                logger.info("waiting for another process's build of the fused CPU ops")
                next_note = now + 30.0
            time.sleep(0.2)


def unavailable_reason() -> str | None:
    why = _state.get("why")
    return why if isinstance(why, str) else None


def main() -> None:
    """`python -m loraxpy.kernels.cpu_fused`: builds the ops now (make install runs it)."""
    logging.basicConfig(level=logging.INFO)
    module = load()
    if module is None:
        raise SystemExit(f"fused CPU ops not built: {unavailable_reason()}")
    print(f"fused CPU ops ready: {module.__file__}")


if __name__ == "__main__":
    main()
