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
    # About 30 s on an idle 2-core machine; twice the budget so that other processes on the same
    # cores (a full `make test`, other sessions) slow it without failing it.
    command = [PY, str(REPO / "bench" / "gpu_check.py"), "--rehearse", "--out", str(out), "--work", str(work)]
    result = subprocess.run([*command, "--budget-s", "116"], capture_output=True, text=True, timeout=180)
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
        ["tests-gpu", "tests-integration", "lora-kernels", "bench-tiny", "targets"], "passed"
    )
    assert seconds < 116 + 10  # its budget, plus interpreter start and the final report
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
    rehearsal = gpu_check.REHEARSAL
    assert sum(rehearsal.budgets.values()) <= gpu_check.REHEARSAL_BUDGET_S
    assert set(rehearsal.budgets) == {
        "setup",
        *(s.name for s in gpu_check.stages(rehearsal, tmp_path, tmp_path, False)),
    }


def test_every_gpu_stage_command_parses_with_its_program(tmp_path: Path) -> None:
    """A renamed flag fails here, not on the GPU machine."""
    from loraxpy.bench import cli, gpu_targets, lora_kernels

    for stage in gpu_check.stages(gpu_check.GPU, tmp_path, tmp_path, xdist=True):
        module, argv = stage.command[2], stage.command[3:]
        if module == "loraxpy.bench.cli":
            config = cli.config_from_args(cli.build_parser().parse_args(argv))
            assert config.device.type == "cuda" and config.cuda_graph_max_batch_size == 128
            assert set(config.batch_sizes) == {1, 128} and set(config.context_lens) == {128, 1024}
        elif module == "loraxpy.bench.lora_kernels":
            assert lora_kernels.build_parser().parse_args(argv).device in ("cuda", "cpu")
        elif module == "loraxpy.bench.gpu_targets":
            with pytest.raises(SystemExit) as e:
                gpu_targets.main([*argv, "--help"])
            assert e.value.code == 0
        else:
            assert module == "pytest"
