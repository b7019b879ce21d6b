"""`make gpu-check` (`python3 bench/gpu_check.py`): everything a GPU session checks and measures,
prepared so that one call of the device tool does it in under 8 minutes.

It runs on the device image's own Python (torch, Triton, transformers, PEFT already there): the
setup installs the carried wheels that image lacks or has too old (`make gpu-wheels` fetches them
into .whl/) and the project without dependencies, then runs, each stage against its own deadline
(a stage's unused time passes to the next) and with its output under $OUT as it goes:

1. tests/gpu: each fast path against its torch twin in fp32, fp16 and bf16, graph replays
   against eager, the warmup self-check, an NCCL group of one shard;
2. the worker integration tests with the workers on CUDA (fp32 equals HF transformers and PEFT
   token for token);
3. the LoRA kernels and each attention backend (SDPA, Triton, and flash-attn / vllm-flash-attn
   where importable: checked against the reference, then timed) against the copy bandwidth, and
   `lorax-bench` on 8b and 1b over a grid trimmed to cover issue 17's targets, with the HF + PEFT
   baseline;
4. the targets, met or not (`bench/gpu_targets.py`), printed last.

$OUT gets at most the device tool's 8 files: summary.json (rewritten after every stage; it also
holds the LoRA and attention kernel numbers and the targets), tests-gpu.log,
tests-integration.log, bench.log, bench-<shape>.json and bench-<shape>.png.
`--rehearse` runs the same script on CPU with the tiny shape and CPU-sized steps, in about 30 s
on an idle machine (tests/unit/test_gpu_check.py), so it cannot rot; its deadlines are the GPU
run's 8 minutes in its stages' proportions, so a loaded machine slows it without failing it.
Standard library only: it runs before the project is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("proto", "router", "worker", "kernels", "bench")  # top-level folders → loraxpy.<name>
TOTAL_BUDGET_S = 480.0
# The rehearsal's stages take about 30 s on an idle 2-core machine, and REHEARSAL's budgets (58 s in
# all) are their shares. On CPU the machine's load decides how long they take, not the code: beside
# a full `make test` and other sessions on the same cores they ran past twice those budgets and were
# killed at their deadlines. So the rehearsal's deadlines are the GPU run's total, scaled to those
# shares: a stage that hangs still ends at its deadline, and a rehearsal on an idle machine ends as
# soon as before.
REHEARSAL_BUDGET_S = TOTAL_BUDGET_S
# What the checks import; the device image has most of them (KINDS.md), the wheels bring the rest.
NEEDED = (
    "torch", "triton", "transformers", "peft", "safetensors", "numpy", "tokenizers", "jinja2",
    "grpcio", "protobuf", "aiohttp", "prometheus-client", "huggingface-hub", "tqdm", "matplotlib",
    "pytest", "pytest-timeout", "pytest-xdist", "pydantic", "gguf", "opentelemetry-proto", "llguidance",
    "flash-attn", "vllm-flash-attn",
)  # fmt: skip


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: float
    command: list[str]
    log: str  # file name under $OUT; stages may share one (appended)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class StageResult:
    name: str
    status: str  # passed | failed | timed out
    returncode: int | None
    seconds: float
    budget_s: float
    allowed_s: float  # the budget plus what earlier stages left unused
    log: str


def run_command(command: list[str], log_path: Path, deadline: float, env: dict[str, str]) -> int | None:
    """Runs `command` with its output appended to `log_path`; kills its whole process group at
    `deadline` (time.monotonic) and returns None then, else its exit code."""
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
        try:
            return proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            log.write("\n[killed: the stage reached its deadline]\n")
            return None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the stage's process group (pytest's workers, spawned lorax-workers), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class Check:
    """One run of the script: where it writes, its clock and what it has found so far."""

    out: Path
    work: Path
    rehearse: bool
    total_budget_s: float
    started: float = field(default_factory=time.monotonic)
    planned_s: float = 0.0  # sum of the budgets of the stages run so far
    env: dict[str, str] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    def run(self, stage: Stage) -> StageResult:
        """Runs a stage until the sum of the budgets so far (capped by the total) has passed."""
        self.planned_s += stage.budget_s
        now = time.monotonic()
        deadline = self.started + min(self.planned_s, self.total_budget_s)
        code = run_command(stage.command, self.out / stage.log, deadline, {**self.env, **stage.env})
        status = "timed out" if code is None else "passed" if code == 0 else "failed"
        result = StageResult(
            stage.name, status, code, round(time.monotonic() - now, 1), stage.budget_s,
            round(max(0.0, deadline - now), 1), stage.log,
        )  # fmt: skip
        self.summary.setdefault("stages", []).append(asdict(result))
        self.collect()
        self.write_summary()
        print(
            f"[gpu-check] {stage.name}: {status} in {result.seconds:.0f} s (of {result.allowed_s:.0f})",
            flush=True,
        )
        return result

    def collect(self) -> None:
        """The kernel numbers and targets the stages wrote under work/ (which does not come back)."""
        for key in ("lora-kernels", "attention-kernels", "targets"):
            path = self.work / f"{key}.json"
            if path.exists():
                try:
                    self.summary[key.replace("-", "_")] = json.loads(path.read_text())
                except ValueError:  # cut off mid-write by a stage's deadline
                    self.summary[key.replace("-", "_")] = {"error": f"{path.name} is not whole JSON"}

    def write_summary(self) -> None:
        self.summary["elapsed_s"] = round(time.monotonic() - self.started, 1)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1))


# ---- setup: wheels, the project, what the image has ----------------------------------------------


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:4])


def wheels_to_install(wheel_dir: Path) -> list[Path]:
    """Carried wheels whose package is missing from this Python or older than the wheel."""
    chosen = []
    for wheel in sorted(wheel_dir.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            chosen.append(wheel)
            continue
        if _version_tuple(have) < _version_tuple(version):
            chosen.append(wheel)
    return chosen


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in NEEDED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def link_tree(root: Path) -> Path:
    """root/loraxpy/<name> → the repo's folders: the package without pip, if the install fails."""
    package = root / "loraxpy"
    package.mkdir(parents=True, exist_ok=True)
    for name in PACKAGES:
        link = package / name
        if not link.exists():
            link.symlink_to(REPO / name, target_is_directory=True)
    return root


def setup(check: Check, wheel_dir: Path, budget_s: float) -> None:
    """Carried wheels into work/site, the project installed (or linked), then what this Python has."""
    check.planned_s += budget_s
    deadline = check.started + check.planned_s
    log = check.work / "setup.log"
    site = check.work / "site"
    wheels = wheels_to_install(wheel_dir) if wheel_dir.is_dir() else []
    info: dict = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "wheels": [w.name for w in wheels],
    }
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    if wheels and not check.rehearse:  # the rehearsal runs in the project's own venv
        targets = [*pip, "--no-compile", "--upgrade", "--target", str(site), *map(str, wheels)]
        info["wheels_installed"] = run_command(targets, log, deadline, check.env) == 0
    # No build isolation: the image cannot download setuptools; its own builds the editable install.
    install = [*pip, "--no-build-isolation", "-e", str(REPO), *(["--dry-run"] if check.rehearse else [])]
    info["project_installed"] = run_command(install, log, deadline, check.env) == 0
    paths = [str(site)]
    if not info["project_installed"]:  # no pip or setuptools to build with: import it through links
        paths.insert(0, str(link_tree(check.work / "src")))
    check.env["PYTHONPATH"] = os.pathsep.join(p for p in [*paths, check.env.get("PYTHONPATH", "")] if p)
    probe = "import torch, loraxpy.worker.runner, loraxpy.bench.cli; print(torch.cuda.is_available())"
    try:  # bounded: a CUDA initialisation that hangs must not take the whole call
        result = subprocess.run(
            [sys.executable, "-c", probe], env=check.env, capture_output=True, text=True, timeout=90
        )
        info["imports"] = result.returncode == 0
        info["cuda"] = result.stdout.strip().endswith("True")
        if result.returncode:
            info["import_error"] = result.stderr.strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        info.update(imports=False, cuda=False, import_error=["the import probe took over 90 s"])
    info["image_packages"] = package_versions()  # this Python's own, under the carried wheels
    info["gpu"] = _nvidia_smi()
    info["log_tail"] = log.read_text()[-3000:] if log.exists() else ""
    check.summary["setup"] = info
    check.write_summary()
    print(
        f"[gpu-check] setup: cuda={info['cuda']} imports={info['imports']} wheels={info['wheels']}",
        flush=True,
    )


def _nvidia_smi() -> str:
    query = [
        "nvidia-smi",
        "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
        "--format=csv,noheader",
    ]
    try:
        return subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


# ---- the stages -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What differs between the GPU run and its CPU rehearsal; the stages are built from it."""

    device: str
    shapes: tuple[str, ...]
    budgets: dict[str, float]  # seconds per stage (and "setup")
    integration: tuple[str, ...]  # pytest's selection, workers on `device`
    kernels: tuple[str, ...]  # bench/lora_kernels.py flags
    attention: tuple[str, ...]  # bench/attention_kernels.py flags
    bench: tuple[str, ...]  # lorax-bench flags, the same for every shape
    targets: tuple[str, ...]  # bench/gpu_targets.py flags: where in the grid each target is read


INTEGRATION = (
    "tests/integration/test_worker_matches_transformers.py",
    "tests/integration/test_worker_lora.py",
    "tests/integration/test_worker_behaviour.py",
)
# Batch 1 and 128 at contexts 128 and 1024, with no adapter, one, and 128 distinct ones, cover every
# target; the PEFT baseline keeps its batch 32 x 128 prompt tokens x 32 adapters but makes 16 new
# tokens, not 64 (at about 24 tok/s on 8b, 64 would take 90 s; its decode rate barely moves).
GPU = Plan(
    device="cuda",
    shapes=("8b", "1b"),
    budgets={
        "setup": 30, "tests-gpu": 85, "tests-integration": 85, "lora-kernels": 20,
        "attention-kernels": 10, "bench-8b": 160, "bench-1b": 80, "targets": 10,
    },
    integration=INTEGRATION,
    # The target reads the Triton kernels (>= 32 adapters: batch 32 and 128, 32 and 128 adapters,
    # both shapes); the torch path's timings would double the stage.
    kernels=("--backends", "triton"),
    attention=("--device", "cuda", "--dtype", "bfloat16", "--shape", "8b", "--batch-size", "128",
               "--context-len", "1024"),
    bench=(
        "--device", "cuda", "--dtype", "bfloat16", "--batch-sizes", "1,128", "--context-lens", "128,1024",
        "--adapter-counts", "128", "--decode-steps", "16", "--cuda-graph-max-batch-size", "128",
        "--baseline-batch", "32", "--baseline-prompt-len", "128", "--baseline-adapters", "32",
        "--baseline-new-tokens", "16",
    ),
    targets=(),
)  # fmt: skip
REHEARSAL = Plan(
    device="cpu",
    shapes=("tiny",),
    budgets={
        "setup": 6, "tests-gpu": 6, "tests-integration": 15, "lora-kernels": 5, "attention-kernels": 4,
        "bench-tiny": 19, "targets": 3,
    },
    # One worker process and no model: the rehearsal proves the flow; the CPU suite proves the worker.
    integration=(INTEGRATION[2], "-k", "missing_model"),
    kernels=(
        "--device", "cpu", "--dtype", "float32", "--shapes", "tiny", "--batch-sizes", "4",
        "--adapter-counts", "2", "--backends", "torch", "--repeats", "3",
    ),
    attention=("--device", "cpu", "--dtype", "float32", "--shape", "tiny", "--batch-size", "4",
               "--context-len", "64", "--repeats", "3"),
    bench=(
        "--device", "cpu", "--dtype", "float32", "--batch-sizes", "1", "--context-lens", "8",
        "--adapter-counts", "1", "--warmup-steps", "1", "--decode-steps", "2",
        "--cuda-graph-max-batch-size", "0", "--baseline-batch", "1", "--baseline-prompt-len", "8",
        "--baseline-adapters", "1", "--baseline-new-tokens", "2",
    ),
    targets=(
        "--big-batch", "1", "--big-context", "8", "--many-adapters", "1", "--kernel-adapters", "2",
        "--peft-adapters", "1", "--decode-shapes", "tiny", "--kernel-backend", "torch",
    ),
)  # fmt: skip


def stages(plan: Plan, out: Path, work: Path, xdist: bool) -> list[Stage]:
    py, budget = sys.executable, plan.budgets
    pytest = [py, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider"]
    # 16 cores there, and spawning workers dominates; loadscope keeps a module (fixtures, order) together.
    parallel = ["-n", "4", "--dist", "loadscope"] if xdist and plan.device == "cuda" else []
    kernels_json, bench_json = work / "lora-kernels.json", [out / f"bench-{s}.json" for s in plan.shapes]
    bench = [
        Stage(
            f"bench-{shape}",
            budget[f"bench-{shape}"],
            [py, "-m", "loraxpy.bench.cli", *plan.bench, "--shapes", shape,
             "--workloads", "base,single,uniform", "--workdir", str(work / "bench"), "-v",
             "--output", str(out / f"bench-{shape}.json"), "--plot", str(out / f"bench-{shape}.png")],
            "bench.log",
        )
        for shape in plan.shapes
    ]  # fmt: skip
    targets = [
        py,
        "-m",
        "loraxpy.bench.gpu_targets",
        "--bench",
        *map(str, bench_json),
        "--kernels",
        str(kernels_json),
    ]
    return [
        Stage(
            "tests-gpu", budget["tests-gpu"], [*pytest, *parallel, "-m", "gpu", "tests/gpu"], "tests-gpu.log"
        ),
        Stage(
            "tests-integration",
            budget["tests-integration"],
            [*pytest, *parallel, *plan.integration],
            "tests-integration.log",
            {"LORAX_TEST_DEVICE": plan.device},
        ),
        Stage(
            "lora-kernels",
            budget["lora-kernels"],
            [py, "-m", "loraxpy.bench.lora_kernels", *plan.kernels, "--output", str(kernels_json)],
            "bench.log",
        ),
        Stage(
            "attention-kernels",
            budget["attention-kernels"],
            [
                py,
                "-m",
                "loraxpy.bench.attention_kernels",
                *plan.attention,
                "--output",
                str(work / "attention-kernels.json"),
            ],
            "bench.log",
        ),
        *bench,
        Stage(
            "targets",
            budget["targets"],
            [*targets, *plan.targets, "--output", str(work / "targets.json")],
            "bench.log",
        ),
    ]


# ---- main -----------------------------------------------------------------------------------------


def scaled(plan: Plan, total_s: float) -> Plan:
    """The plan with every stage's budget (and setup's) scaled so that they add up to `total_s`."""
    factor = total_s / sum(plan.budgets.values())
    return replace(plan, budgets={k: v * factor for k, v in plan.budgets.items()})


def base_env(work: Path, rehearse: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", MPLBACKEND="Agg", TOKENIZERS_PARALLELISM="false")
    # Stages run in the repo: without this, `python -m` puts it first on sys.path and its kernels/
    # folder shadows Hugging Face's `kernels` package, which transformers imports when installed.
    env["PYTHONSAFEPATH"] = "1"
    if not rehearse:  # nothing outside the device machine can be reached
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", LORAX_CACHE=str(work / "cache"))
    return env


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return ""


def finish(check: Check) -> int:
    """Puts the targets into the summary and prints the stages and targets last (the reply's tail)."""
    check.collect()
    check.write_summary()
    stages = check.summary.get("stages", [])
    print("\n[gpu-check] stages")
    for s in stages:
        print(f"  {s['status']:>10}  {s['seconds']:6.0f} s  {s['name']}  ({s['log']})")
    for t in check.summary.get("targets", []):
        value = "-" if t["measured"] is None else f"{t['measured']:.3f}"
        print(f"  {t['status']:>12}  {t['shape']:>5}  {value:>9} (needs {t['threshold']})  {t['name']}")
    attention = check.summary.get("attention_kernels", {})
    for r in attention.get("runs", []):
        share = "-" if r["efficiency"] is None else f"{r['efficiency']:.1%} of copy"
        print(
            f"  attention {r['backend']:>16}  B={r['batch_size']} ctx={r['context_len']}: {share} {r['note']}"
        )
    for name, why in attention.get("not_measured", {}).items():
        print(f"  attention {name:>16}  not measured: {why}")
    files = sorted(p.name for p in check.out.iterdir())
    print(f"[gpu-check] {check.summary['elapsed_s']:.0f} s; files in {check.out}: {files}")
    return 0 if stages and all(s["status"] == "passed" for s in stages) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--rehearse", action="store_true", help="CPU, tiny shape, CPU-sized steps (about 30 s idle)"
    )
    p.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="results (default $OUT)")
    p.add_argument("--work", type=Path, default=Path("/tmp/lorax-gpu-check"), help="models, caches, installs")
    p.add_argument("--wheels", type=Path, default=REPO / ".whl", help="carried wheels (make gpu-wheels)")
    p.add_argument(
        "--budget-s",
        type=float,
        help="total seconds, every stage's share scaled to it (default 480, rehearsing too)",
    )
    args = p.parse_args(argv)
    if args.out is None:
        p.error("--out or $OUT is required")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    plan = REHEARSAL if args.rehearse else GPU
    budget = args.budget_s or (REHEARSAL_BUDGET_S if args.rehearse else TOTAL_BUDGET_S)
    plan = scaled(plan, budget)
    check = Check(args.out, args.work, args.rehearse, budget, env=base_env(args.work, args.rehearse))
    check.summary = {"mode": "rehearsal" if args.rehearse else "gpu", "commit": _commit(), "budget_s": budget}
    setup(check, args.wheels, plan.budgets["setup"])
    xdist = check.summary["setup"]["image_packages"].get("pytest-xdist") is not None
    for stage in stages(plan, args.out, args.work, xdist):
        check.run(stage)
    return finish(check)


if __name__ == "__main__":
    sys.exit(main())
