"""Compiles Triton kernel launches ahead of time for GPUs this machine lacks, and checks their resources.

A `Launch` (kernels/triton_launch.py) becomes a `Job`: the kernel's module and name, its
arguments reduced to what Triton specialises on (pointer dtype and 16-byte alignment, integer
value class), constexprs and options, and a target (sm_80, sm_90). Jobs compile in worker
processes (`python -m loraxpy.kernels.triton_aot --worker`) outside Triton's interpreter, through
`JITFunction.warmup`, the same code path as a launch, with a driver stand-in that only names the
target. Each compiled kernel's registers and local memory come from its cubin (cuobjdump: the
values the runtime's `n_regs` and `n_spills` read back on a device), shared memory from its
metadata; `problems` names every limit a kernel breaks.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from loraxpy.kernels.triton_launch import Launch

try:
    import triton
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


@dataclass(frozen=True)
class Target:
    """A GPU architecture's per-block limits (CUDA occupancy tables; Triton's own checks at load)."""

    arch: int  # compute capability, 80 = sm_80
    name: str
    max_shared: int  # bytes of shared memory one block may opt in to
    max_regs_per_thread: int = 255
    regs_per_block: int = 65536


TARGETS = {
    80: Target(80, "sm_80 (A100)", max_shared=166912),
    90: Target(90, "sm_90 (H100/H200)", max_shared=232448),
}


@dataclass(frozen=True)
class Job:
    """What Triton compiles for one launch on one target; equal jobs compile to the same kernel."""

    module: str  # the kernel's module, imported by name, or by `path` where that fails
    path: str
    kernel: str
    arch: int
    args: tuple[Any, ...]  # tensors as ("tensor", dtype, is 16-byte aligned); ints, floats, bools as given
    constexprs: tuple[tuple[str, Any], ...]
    options: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, launch: Launch, arch: int) -> Job:
        module = sys.modules[launch.kernel.__module__]
        return cls(
            module=module.__name__,
            path=os.path.abspath(module.__file__ or ""),
            kernel=launch.name,
            arch=arch,
            args=tuple(_describe(a) for a in launch.args),
            constexprs=tuple(sorted(launch.constexprs.items())),
            options=tuple(sorted(launch.options.items())),
        )

    def key(self) -> tuple[Any, ...]:
        """The job reduced to Triton's value classes, at least as fine as Triton's own specialisation,
        so deduplicating never merges two kernels Triton would compile apart."""
        args = tuple(_value_class(a) for a in self.args)
        return (self.module, self.kernel, self.arch, args, self.constexprs, self.options)

    @property
    def dtype(self) -> str:
        """The first tensor argument's dtype: the precision this kernel was compiled for."""
        return next((a[1] for a in self.args if isinstance(a, tuple)), "-")


def _describe(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):
        return ("tensor", str(arg.dtype).removeprefix("torch."), arg.data_ptr() % 16 == 0)
    if isinstance(arg, bool | int | float):
        return arg
    raise TypeError(f"a launch argument Triton cannot take: {type(arg).__name__}")


def _value_class(arg: Any) -> Any:
    """Triton specialises ints on == 1 and on divisibility by 16, and widens them past int32."""
    if isinstance(arg, bool | float | tuple):
        return arg if isinstance(arg, tuple) else type(arg).__name__
    return ("int", arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31)


@dataclass(frozen=True)
class Report:
    """A compiled kernel's resources, or why it did not compile."""

    n_regs: int = 0  # registers per thread
    spill_bytes: int = 0  # local memory per thread (spilled registers); the runtime's n_spills is this / 4
    shared: int = 0  # bytes of shared memory per block
    num_warps: int = 0
    num_stages: int = 0
    seconds: float = 0.0
    error: str = ""


def problems(job: Job, report: Report) -> list[str]:
    """Every limit of the job's target that the compiled kernel breaks, each naming the specialisation."""
    target = TARGETS[job.arch]
    spec = describe(job)
    if report.error:
        return [f"{spec}: does not compile: {report.error}"]
    found = []
    if report.spill_bytes > 0:
        found.append(f"{spec}: spills {report.spill_bytes} bytes per thread ({report.n_regs} registers)")
    if report.shared > target.max_shared:
        found.append(
            f"{spec}: needs {report.shared} bytes of shared memory, {target.name} has {target.max_shared}"
        )
    threads = report.num_warps * 32
    if report.n_regs > target.max_regs_per_thread or report.n_regs * threads > target.regs_per_block:
        found.append(f"{spec}: {report.n_regs} registers × {threads} threads exceed {target.name}'s")
    return found


def describe(job: Job) -> str:
    constexprs = ", ".join(f"{k}={v}" for k, v in job.constexprs)
    options = "".join(f", {k}={v}" for k, v in job.options)
    return f"{job.kernel} sm_{job.arch} {job.dtype} [{constexprs}{options}]"


@dataclass(frozen=True)
class Planned:
    """One kernel to compile, and every use (model, dtype, layer) that launches exactly it."""

    job: Job
    uses: tuple[object, ...]


def plan(launches: Iterable[tuple[object, Launch]], archs: Iterable[int] = tuple(TARGETS)) -> list[Planned]:
    """The distinct jobs behind labelled launches on every target: equal specialisations compile once."""
    uses: dict[tuple[Any, ...], tuple[Job, list[object]]] = {}
    for use, launch in launches:
        for arch in archs:
            job = Job.of(launch, arch)
            uses.setdefault(job.key(), (job, []))[1].append(use)
    return [Planned(job, tuple(labels)) for job, labels in uses.values()]


def default_workers() -> int:
    """One compile worker per core, up to 8: compiling is CPU-bound (Triton's passes, then ptxas), and
    each worker holds its own torch and Triton."""
    return max(1, min(8, os.cpu_count() or 1))


def compile_jobs(jobs: Sequence[Job], num_workers: int) -> list[Report]:
    """Compiles every job in `num_workers` worker processes; reports in the order of `jobs`."""
    if triton is None:
        raise RuntimeError("compiling Triton kernels needs triton")
    reports: list[Report | None] = [None] * len(jobs)
    pending = iter(enumerate(jobs))
    lock = threading.Lock()
    threads = [
        threading.Thread(target=_feed_worker, args=(pending, lock, reports))
        for _ in range(max(1, min(num_workers, len(jobs))))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r or Report(error="the compile worker stopped before this job") for r in reports]


def _feed_worker(
    pending: Iterator[tuple[int, Job]], lock: threading.Lock, reports: list[Report | None]
) -> None:
    """Hands jobs one at a time to one worker process, so slow kernels do not queue behind a chunk."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter cannot compile
    cmd = [sys.executable, "-m", "loraxpy.kernels.triton_aot", "--worker"]
    with subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True
    ) as worker:
        assert worker.stdin is not None and worker.stdout is not None
        while True:
            with lock:
                index, job = next(pending, (-1, None))
            if job is None:
                break
            worker.stdin.write(json.dumps(asdict(job)) + "\n")
            worker.stdin.flush()
            line = worker.stdout.readline()
            if not line:
                reports[index] = Report(error=f"the compile worker exited ({worker.poll()})")
                break
            reports[index] = Report(**json.loads(line))
        worker.stdin.close()


class _OfflineDriver:
    """Stands in for the CUDA driver during `warmup`: names the target; device ids key its caches."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return self.target.arch

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target


class _Pointer:
    """A tensor argument as Triton's specialisation sees it: a dtype and an address."""

    def __init__(self, dtype: str, is_aligned: bool) -> None:
        self.dtype = getattr(torch, dtype)
        self._address = 0 if is_aligned else 8

    def data_ptr(self) -> int:
        return self._address


def _jit_kernel(job: Job) -> Any:
    """The kernel as its module JIT-decorates it (`jit_kernels()`), or plainly decorated if it has none."""
    import importlib
    import importlib.util

    try:
        module = importlib.import_module(job.module)
    except ImportError:
        spec = importlib.util.spec_from_file_location(job.module, job.path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    kernels = module.jit_kernels() if hasattr(module, "jit_kernels") else {}
    return kernels.get(job.kernel) or triton.jit(getattr(module, job.kernel))


def compile_job(job: Job) -> Report:
    """Compiles one job in this process (which must not run Triton's interpreter) and reads its resources."""
    from triton.runtime.driver import driver

    started = time.perf_counter()
    try:
        kernel = _jit_kernel(job)
        args = [_Pointer(a[1], a[2]) if isinstance(a, tuple) else a for a in job.args]
        driver.set_active(_OfflineDriver(job.arch))  # type: ignore[arg-type]
        compiled = kernel.warmup(*args, grid=(1,), **dict(job.constexprs), **dict(job.options))
    except Exception as e:  # a kernel that fails to compile is a finding, reported with its job
        return Report(error=_summary(e))
    n_regs, spill_bytes = _cubin_resources(compiled.asm["cubin"], compiled.name)
    meta = compiled.metadata
    return Report(
        n_regs, spill_bytes, meta.shared, meta.num_warps, meta.num_stages, time.perf_counter() - started
    )


def _summary(error: Exception) -> str:
    """An exception in one line: Triton's compile errors lead with where, ptxas's with what failed."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    where_and_what = " … ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else ""
    return f"{type(error).__name__}: {where_and_what}"


def _cubin_resources(cubin: bytes, name: str) -> tuple[int, int]:
    """(registers, stack + local bytes) per thread of kernel `name`, as cuobjdump reads them from the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    line = usage[usage.index(f"Function {name}:") :]
    fields = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line.split("\n", 2)[1])}
    return fields["REG"], fields["STACK"] + fields["LOCAL"]


def _worker(lines: Iterable[str], out: Any) -> None:
    """Compiles each job (one JSON object a line) and answers each with one JSON report line."""
    import warnings

    warnings.simplefilter("ignore")
    for line in lines:
        fields = json.loads(line)
        job = Job(**{k: _tuples(v) for k, v in fields.items()})
        out.write(json.dumps(asdict(compile_job(job))) + "\n")
        out.flush()


def _tuples(value: Any) -> Any:
    """JSON turned the job's tuples into lists; hashable jobs need them back."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


if __name__ == "__main__":
    if sys.argv[1:] != ["--worker"]:
        sys.exit("usage: python -m loraxpy.kernels.triton_aot --worker  (compile_jobs starts these)")
    results, sys.stdout = sys.stdout, sys.stderr  # Triton's own prints must not reach the report stream
    _worker(sys.stdin, results)
