"""`make gpu-check` on CPU: its deadlines, its wheel choice, its fallback install, and the whole
script rehearsed end to end (tiny shape, CPU-sized steps), so the one command a GPU session gets
to run cannot rot between sessions that have a GPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

from loraxpy.bench import gpu_check
from loraxpy.bench.gpu_check import Check, Stage, link_tree, run_command, wheels_to_install

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


def test_a_stage_past_its_deadline_is_killed_with_its_children_and_its_output_kept(tmp_path: Path) -> None:
    log = tmp_path / "stage.log"
    child = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('child', p.pid, flush=True)\n"
        "time.sleep(60)"
    )
    started = time.monotonic()
    assert run_command([PY, "-c", child], log, time.monotonic() + 1.5, dict(os.environ)) is None
    assert time.monotonic() - started < 10
    text = log.read_text()
    assert "child" in text and "[killed: the stage reached its deadline]" in text
    pid = int(re.search(r"child (\d+)", text).group(1))  # type: ignore[union-attr]
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "a stage's spawned processes die with it"


def test_a_stage_gets_its_budget_plus_what_earlier_stages_left_within_the_total(tmp_path: Path) -> None:
    check = Check(tmp_path, tmp_path, rehearse=True, total_budget_s=12.0, env=dict(os.environ))
    quick = [PY, "-c", "pass"]
    first = check.run(Stage("first", 5.0, quick, "a.log"))
    second = check.run(Stage("second", 1.0, quick, "a.log"))
    third = check.run(Stage("third", 30.0, [PY, "-c", "import sys; sys.exit(3)"], "a.log"))
    assert first.status == second.status == "passed" and third.status == "failed" and third.returncode == 3
    assert second.allowed_s > 5.0  # its own second and most of the first stage's five
    assert third.allowed_s <= 12.0  # never past the total
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["first", "second", "third"]


def test_only_wheels_the_python_lacks_or_has_older_are_installed(tmp_path: Path) -> None:
    have = metadata.version("pytest")
    for version in (have, "0.1", "999.0"):
        (tmp_path / f"pytest-{version}-py3-none-any.whl").write_bytes(b"")
    for name in ("no_such_package_xyz-1.0-py3-none-any.whl",):
        (tmp_path / name).write_bytes(b"")
    chosen = sorted(w.name for w in wheels_to_install(tmp_path))
    assert chosen == ["no_such_package_xyz-1.0-py3-none-any.whl", "pytest-999.0-py3-none-any.whl"]


def test_without_pip_the_project_imports_through_a_tree_of_links(tmp_path: Path) -> None:
    root = link_tree(tmp_path / "src")
    probe = "import loraxpy.bench.gpu_targets as m; print(m.__file__)"
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([PY, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip().startswith(str(root))


@pytest.mark.slow
def test_the_rehearsal_runs_every_stage_on_cpu(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    started = time.monotonic()
    # About 30 s on an idle 2-core machine; its default deadlines (the GPU run's 480 s in the
    # rehearsal's proportions) let other processes on the same cores slow it without failing it.
    command = [PY, str(REPO / "bench" / "gpu_check.py"), "--rehearse", "--out", str(out), "--work", str(work)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=gpu_check.REHEARSAL_BUDGET_S + 60
    )
    seconds = time.monotonic() - started
    summary = json.loads((out / "summary.json").read_text())
    logs = {p.name: p.read_text()[-2000:] for p in out.glob("*.log")}
    assert result.returncode == 0, (result.stdout[-3000:], logs)
    assert (
        summary["mode"] == "rehearsal"
        and summary["setup"]["imports"]
        and summary["setup"]["project_installed"]
    )
    stages = {s["name"]: s["status"] for s in summary["stages"]}
    assert stages == dict.fromkeys(
        ["tests-gpu", "tests-integration", "lora-kernels", "attention-kernels", "bench-tiny", "targets"],
        "passed",
    )
    assert [r["backend"] for r in summary["attention_kernels"]["runs"]] == ["sdpa"]  # CPU: SDPA only
    assert summary["lora_kernels"]["runs"]
    assert summary["budget_s"] == gpu_check.REHEARSAL_BUDGET_S
    assert seconds < summary["budget_s"] + 10  # its budget, plus interpreter start and the final report
    # The device tool returns at most 8 plain files, named in letters, digits, '.', '_' and '-'.
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files) and len(files) <= 8
    assert {"summary.json", "bench-tiny.json", "bench-tiny.png", "tests-gpu.log"} <= set(files)
    assert {t["status"] for t in summary["targets"]} <= {"met", "not met"}, "every target measured"
    assert len(summary["targets"]) == 6
    assert "[gpu-check] stages" in result.stdout


def test_the_gpu_plan_fits_the_device_call(tmp_path: Path) -> None:
    """Eight minutes in all, eight files at most under $OUT, both shapes benchmarked."""
    plan = gpu_check.GPU
    stages = gpu_check.stages(plan, tmp_path, tmp_path, xdist=True)
    assert sum(plan.budgets.values()) <= gpu_check.TOTAL_BUDGET_S
    assert set(plan.budgets) == {"setup", *(s.name for s in stages)}
    assert len({s.log for s in stages}) + 1 + 2 * len(plan.shapes) <= 8  # logs, summary, JSON + PNG per shape
    assert [s.name for s in stages if s.name.startswith("bench-")] == ["bench-8b", "bench-1b"]
    assert gpu_check.scaled(plan, gpu_check.TOTAL_BUDGET_S).budgets == plan.budgets  # the GPU keeps its own
    rehearsal = gpu_check.REHEARSAL
    # The rehearsal's stages take their shares of the GPU run's total: generous on CPU, whatever its load.
    assert gpu_check.REHEARSAL_BUDGET_S == gpu_check.TOTAL_BUDGET_S
    generous = gpu_check.scaled(rehearsal, gpu_check.REHEARSAL_BUDGET_S).budgets
    assert sum(generous.values()) == pytest.approx(gpu_check.REHEARSAL_BUDGET_S)
    assert all(generous[k] > 8 * v for k, v in rehearsal.budgets.items())
    assert set(rehearsal.budgets) == {
        "setup",
        *(s.name for s in gpu_check.stages(rehearsal, tmp_path, tmp_path, False)),
    }


def test_every_gpu_stage_command_parses_with_its_program(tmp_path: Path) -> None:
    """A renamed flag fails here, not on the GPU machine."""
    from loraxpy.bench import attention_kernels, cli, gpu_targets, lora_kernels

    for stage in gpu_check.stages(gpu_check.GPU, tmp_path, tmp_path, xdist=True):
        module, argv = stage.command[2], stage.command[3:]
        if module == "loraxpy.bench.cli":
            config = cli.config_from_args(cli.build_parser().parse_args(argv))
            assert config.device.type == "cuda" and config.engine.cuda_graph_max_batch_size == 128
            assert set(config.batch_sizes) == {1, 128} and set(config.context_lens) == {128, 1024}
        elif module == "loraxpy.bench.lora_kernels":
            assert lora_kernels.build_parser().parse_args(argv).device in ("cuda", "cpu")
        elif module == "loraxpy.bench.attention_kernels":
            parsed = attention_kernels.build_parser().parse_args(argv)
            assert (parsed.device, parsed.shape, parsed.batch_size, parsed.context_len) == (
                "cuda",
                "8b",
                128,
                1024,
            )
        elif module == "loraxpy.bench.gpu_targets":
            with pytest.raises(SystemExit) as e:
                gpu_targets.main([*argv, "--help"])
            assert e.value.code == 0
        else:
            assert module == "pytest"


# The GPU image's Python packages (the device tool's KINDS.md, read on a machine on 2026-11-17).
GPU_IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp""".split()  # noqa: SIM905
# Run in a child: modules of any installed distribution that is neither in the image nor carried
# (the Makefile's GPU_WHEELS) fail to import, as they would there; then what the check runs loads.
_IMAGE_ONLY = """
import importlib.abc, importlib.metadata as md, sys
allowed = {n.lower().replace("_", "-") for n in sys.argv[1].split()} | {"loraxpy"}
blocked = {top for top, dists in md.packages_distributions().items()
           if not any(d.lower().replace("_", "-") in allowed for d in dists)}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"{name} is neither in the GPU image nor in make gpu-wheels")
sys.meta_path.insert(0, Block())
for module in ("loraxpy.worker.cli", "loraxpy.bench.cli", "loraxpy.bench.lora_kernels",
               "loraxpy.bench.attention_kernels", "loraxpy.bench.gpu_targets", "loraxpy.bench.baseline",
               "loraxpy.router.launcher"):  # the whole server too, for a session with time left
    __import__(module)
import pytest
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sys.argv[2:]]))
"""


@pytest.mark.slow
def test_what_the_check_runs_imports_with_only_the_gpu_image_and_the_carried_wheels() -> None:
    """A test module or bench that starts importing a package the image lacks fails here, not there."""
    makefile = (REPO / "Makefile").read_text()
    wheels = re.search(r"^GPU_WHEELS \?= ((?:.*\\\n)*.*)$", makefile, re.M).group(1)  # type: ignore[union-attr]
    allowed = " ".join([*GPU_IMAGE, *wheels.replace("\\\n", " ").split()])
    selection = ["tests/gpu", *gpu_check.INTEGRATION]
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # the venv's plugins are not there
    result = subprocess.run(
        [PY, "-c", _IMAGE_ONLY, allowed, *selection],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert " collected" in result.stdout or "tests collected" in result.stdout
