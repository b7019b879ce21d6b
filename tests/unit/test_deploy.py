"""deploy/'s Helm chart agrees with the code: rendered by Helm itself (helm-python-sdk bundles Helm's
Go SDK) and parsed with the real `lorax-router` / `lorax-worker` parsers. The Dockerfiles are
checked in test_deploy_images.py."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraxpy.proto.settings import env_names
from loraxpy.router.config import RouterConfig
from loraxpy.router.config import parse_args as parse_router_args
from loraxpy.router.launcher import adapter_slots
from loraxpy.worker.config import WorkerConfig
from loraxpy.worker.config import parse_args as parse_worker_args
from loraxpy.worker.model_source import HUB_PATTERNS, hub_snapshot

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "loraxpy"
NAMESPACE = "inference"
POD_INDEX = "metadata.labels['apps.kubernetes.io/pod-index']"
# Every optional branch of the templates switched on.
FULL_VALUES: dict[str, Any] = {
    "model": {"revision": "0123abcd"},
    "adapters": {"source": "local", "root": "/adapters", "volume": {"hostPath": {"path": "/a"}}},
    "s3": {"endpointUrl": "http://minio:9000", "secretName": "s3-credentials"},
    "secrets": {
        "hfToken": {"name": "hub-token"},
        "apiKey": {"name": "router-key", "key": "key"},
        "workerSecret": {"name": "worker-auth", "key": "secret"},
    },
    "workerTls": {"secretName": "worker-tls"},
    "router": {"maxInputLength": 1000, "maxTotalTokens": 2048, "otlpEndpoint": "http://otel:4318"},
    "worker": {"replicas": 3, "extraArgs": ["--block-size=32"], "resources": {"limits": {"memory": "64Gi"}}},
}
OFFLINE_LOCAL_VALUES: dict[str, Any] = {"model": {"id": "/data/models/llama", "offline": True}}
VALUE_SETS = pytest.mark.parametrize(
    "values", [{}, FULL_VALUES, OFFLINE_LOCAL_VALUES], ids=["defaults", "full", "offline-local"]
)
# Env vars that carry secrets: only ever from a Secret.
SECRET_ENV = {
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "API_KEY",
    "WORKER_SECRET",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
}
# Read by Python, Triton and the hub client for their own files: the chart points it at /tmp.
LIBRARY_ENV = {"HOME"}
# Each image and the console script it runs.
DOCKERFILES = {
    "Dockerfile.router": "lorax-router",
    "Dockerfile.worker": "lorax-worker",
    "Dockerfile": "lorax-launcher",
}


@dataclasses.dataclass
class Rendered:
    """`helm template demo -n inference` of the chart, and the values Helm merged for it."""

    docs: list[dict[str, Any]]
    values: dict[str, Any]

    def find(self, kind: str, component: str) -> dict[str, Any]:
        key = "app.kubernetes.io/component"
        (found,) = [d for d in self.docs if (d["kind"], d["metadata"]["labels"][key]) == (kind, component)]
        return found

    def pod(self, component: str) -> dict[str, Any]:
        kind = "StatefulSet" if component == "worker" else "Deployment"
        return self.find(kind, component)["spec"]["template"]

    def container(self, component: str) -> dict[str, Any]:
        return next(c for c in self.pod(component)["spec"]["containers"] if c["name"] == component)


def render(values: dict[str, Any]) -> Rendered:
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the dev extra) renders the chart")
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name="demo", namespace=NAMESPACE)
        merged = chart.merge_values(values)
    docs = [doc for name, text in files.items() if name.endswith(".yaml") for doc in yaml.safe_load_all(text)]
    return Rendered([doc for doc in docs if doc], merged)


def container_port(c: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


def pod_env(c: dict[str, Any], rank: int = 0) -> dict[str, str]:
    """The container's env as its pod sees it: the pod index for the downward API, a marker for Secrets."""
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in e["valueFrom"]:
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == POD_INDEX
            env[e["name"]] = str(rank)
        else:
            env[e["name"]] = "secret:" + e["valueFrom"]["secretKeyRef"]["name"]
    return env


def pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def router_env_names() -> set[str]:
    return {f.name.upper() for f in dataclasses.fields(RouterConfig)}


def worker_env_names() -> set[str]:
    """The worker's flags' variables (declared with proto/settings.py), the ones worker/config.py reads
    by hand, and the rest: torch's env:// rendezvous and boto3's."""
    names = set(re.findall(r'(?:env\.get|_env_flag)\("([A-Z_]+)"', (REPO / "worker/config.py").read_text()))
    names |= env_names(WorkerConfig)
    assert 'init_method="env://"' in (REPO / "worker/distributed.py").read_text()
    assert "AWS_ENDPOINT_URL" in (REPO / "worker/adapter_sources.py").read_text()
    return names | {"MASTER_ADDR", "MASTER_PORT", "AWS_ENDPOINT_URL"}


def as_in_the_pod(c: dict[str, Any], rank: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pod's env and no other; flags must be spelled out (argparse would take a prefix of one)."""
    for name in router_env_names() | worker_env_names() | {"HUGGING_FACE_HUB_TOKEN"}:
        monkeypatch.delenv(name, raising=False)
    for name, value in pod_env(c, rank).items():
        monkeypatch.setenv(name, value)
    init = argparse.ArgumentParser.__init__

    def strict_init(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **{**kwargs, "allow_abbrev": False})

    monkeypatch.setattr(argparse.ArgumentParser, "__init__", strict_init)


def parse_router(chart: Rendered, monkeypatch: pytest.MonkeyPatch) -> RouterConfig:
    as_in_the_pod(chart.container("router"), 0, monkeypatch)
    return parse_router_args(chart.container("router")["args"], prog="lorax-router")


def parse_worker(chart: Rendered, rank: int, monkeypatch: pytest.MonkeyPatch) -> WorkerConfig:
    as_in_the_pod(chart.container("worker"), rank, monkeypatch)
    return parse_worker_args(chart.container("worker")["args"])


# ---- the chart ----


@VALUE_SETS
def test_chart_passes_helm_lint_without_warnings(values: dict[str, Any]) -> None:
    helm = pytest.importorskip("helm_python")
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_chart_runs_the_package_console_scripts_at_the_package_version() -> None:
    chart, project = render({}), pyproject()["project"]
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"] == project["version"]
    scripts = project["scripts"]
    assert scripts[chart.container("router")["command"][0]] == "loraxpy.router.launcher:router_main"
    assert scripts[chart.container("worker")["command"][0]] == "loraxpy.worker.cli:main"


@VALUE_SETS
def test_router_args_parse_with_the_router_parser(
    values: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    chart = render(values)
    config, v = parse_router(chart, monkeypatch), chart.values
    assert (config.hostname, config.model_id) == ("0.0.0.0", v["model"]["id"])
    adapters = v["adapters"]
    assert (config.adapter_source, config.max_active_adapters) == (adapters["source"], adapters["maxActive"])
    assert config.max_input_length == v["router"].get("maxInputLength")  # Helm drops nulls
    assert config.otlp_endpoint == (v["router"]["otlpEndpoint"] or None)
    assert config.api_key == ("secret:router-key" if values is FULL_VALUES else None)


@VALUE_SETS
def test_worker_args_parse_with_the_worker_parser_on_every_rank(
    values: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    chart = render(values)
    v, router = chart.values, parse_router(chart, monkeypatch)
    mount = Path(v["cache"]["mountPath"])
    for rank in range(v["worker"]["replicas"]):
        config = parse_worker(chart, rank, monkeypatch)
        assert (config.rank, config.world_size, config.local_rank) == (rank, v["worker"]["replicas"], 0)
        assert (config.model_id, config.revision) == (v["model"]["id"], v["model"]["revision"] or None)
        assert config.offline == v["model"]["offline"]
        assert config.max_loras == adapter_slots(router)  # what lorax-launcher asks of each shard
        assert config.adapter_root == (Path(v["adapters"]["root"]) if v["adapters"]["root"] else None)
        assert config.hub_token == ("secret:hub-token" if values is FULL_VALUES else None)
        assert config.hub_cache_dir is not None
        assert mount in config.cache_dir.parents and mount in config.hub_cache_dir.parents


@VALUE_SETS
def test_every_env_var_set_is_one_the_code_reads(values: dict[str, Any]) -> None:
    chart = render(values)
    assert {e["name"] for e in chart.container("router").get("env", [])} <= router_env_names() | LIBRARY_ENV
    assert {e["name"] for e in chart.container("worker")["env"]} <= worker_env_names() | LIBRARY_ENV
    for init in chart.pod("router")["spec"].get("initContainers", []):
        assert {e["name"] for e in init.get("env", [])} <= ({"HF_TOKEN"} & worker_env_names()) | LIBRARY_ENV


def test_secrets_come_from_secret_references_never_from_values() -> None:
    chart = render(FULL_VALUES)
    pods = [chart.pod("router")["spec"], chart.pod("worker")["spec"]]
    refs = {}
    for c in [c for spec in pods for c in spec["containers"] + spec.get("initContainers", [])]:
        assert not any(a.startswith(("--api-key", "--worker-secret=")) for a in c.get("args", []))
        for e in c.get("env", []):
            if e["name"] in SECRET_ENV:
                assert "value" not in e, f"{e['name']} is inline in {c['name']}"
                refs[e["name"]] = e["valueFrom"]["secretKeyRef"]
        assert all(list(source) == ["secretRef"] for source in c.get("envFrom", []))
    assert refs["HF_TOKEN"] == {"name": "hub-token", "key": "HF_TOKEN"}
    assert refs["API_KEY"] == {"name": "router-key", "key": "key"}
    assert refs["WORKER_SECRET"] == {"name": "worker-auth", "key": "secret"}


@pytest.mark.parametrize("replicas", [1, 3])
def test_worker_addresses_list_every_shard_in_rank_order(
    replicas: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    chart = render({"worker": {"replicas": replicas}})
    statefulset, headless = chart.find("StatefulSet", "worker"), chart.find("Service", "worker")
    name, service = statefulset["metadata"]["name"], headless["metadata"]["name"]
    hosts = [f"{name}-{rank}.{service}.{NAMESPACE}.svc.cluster.local" for rank in range(replicas)]
    port = container_port(chart.container("worker"), "grpc")
    addresses = parse_router(chart, monkeypatch).worker_addresses or ""
    assert addresses.split(",") == [f"{host}:{port}" for host in hosts]
    assert (statefulset["spec"]["replicas"], statefulset["spec"]["serviceName"]) == (replicas, service)
    env = pod_env(chart.container("worker"))
    assert (env["WORLD_SIZE"], env["MASTER_ADDR"]) == (str(replicas), hosts[0])


def test_worker_rank_is_the_pod_index_and_no_rank_waits_for_another_to_be_ready() -> None:
    chart = render({"worker": {"replicas": 3}})
    rank = next(e for e in chart.container("worker")["env"] if e["name"] == "RANK")
    assert rank["valueFrom"]["fieldRef"]["fieldPath"] == POD_INDEX
    # Rank 0 turns ready only once every rank has joined: neither pod start nor DNS may wait for it.
    statefulset, headless = chart.find("StatefulSet", "worker"), chart.find("Service", "worker")
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    assert (headless["spec"]["clusterIP"], headless["spec"]["publishNotReadyAddresses"]) == ("None", True)
    labels = chart.pod("worker")["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= labels.items()
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= labels.items()


@VALUE_SETS
def test_ports_agree_between_args_containers_services_and_probes(
    values: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    chart = render(values)
    rc, wc = chart.container("router"), chart.container("worker")
    http, grpc = container_port(rc, "http"), container_port(wc, "grpc")
    rendezvous = container_port(wc, "rendezvous")
    assert parse_router(chart, monkeypatch).port == http
    assert parse_worker(chart, 0, monkeypatch).listen == f"0.0.0.0:{grpc}"
    assert chart.pod("router")["metadata"]["annotations"]["prometheus.io/port"] == str(http)
    assert chart.find("Service", "router")["spec"]["ports"][0]["targetPort"] == "http"
    service_ports = chart.find("Service", "worker")["spec"]["ports"]
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service_ports}
    assert ports == {"grpc": (grpc, "grpc"), "rendezvous": (rendezvous, "rendezvous")}
    assert pod_env(wc)["MASTER_PORT"] == str(rendezvous)
    for probe in ("startupProbe", "readinessProbe"):
        assert rc[probe]["httpGet"] == {"path": "/health", "port": "http"}
    # /health is 503 while the router heals its workers: that must not get it restarted.
    assert rc["livenessProbe"] == {"tcpSocket": {"port": "http"}, "periodSeconds": 20, "failureThreshold": 3}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert wc[probe]["tcpSocket"] == {"port": "grpc"}  # the Worker service has no grpc.health.v1


def test_router_is_one_replica_replaced_not_rolled_and_scraped_for_metrics() -> None:
    chart = render({})
    spec = chart.find("Deployment", "router")["spec"]
    assert (spec["replicas"], spec["strategy"]) == (1, {"type": "Recreate"})
    annotations = chart.pod("router")["metadata"]["annotations"]
    assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/path"]) == ("true", "/metrics")


@VALUE_SETS
def test_each_worker_pod_takes_one_gpu_and_the_router_none(values: dict[str, Any]) -> None:
    chart = render(values)
    assert chart.container("worker")["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in json.dumps(chart.pod("router"))


@VALUE_SETS
def test_router_sees_the_tokenizer_where_the_workers_report_it(values: dict[str, Any]) -> None:
    chart = render(values)
    mounts = [
        {m["name"]: m["mountPath"] for m in chart.container(c)["volumeMounts"]} for c in ("router", "worker")
    ]
    assert mounts[0]["cache"] == mounts[1]["cache"]
    volumes = [{v["name"]: v for v in chart.pod(c)["spec"]["volumes"]} for c in ("router", "worker")]
    assert volumes[0]["cache"] == volumes[1]["cache"]
    inits = chart.pod("router")["spec"].get("initContainers", [])
    if values is OFFLINE_LOCAL_VALUES:  # nothing to download: the folder must be on the shared volume
        assert inits == []
        return
    script, model_id, revision, hub_cache = inits[0]["command"][2:]
    assert f"--model-id={model_id}" in chart.container("worker")["args"]
    assert revision == chart.values["model"]["revision"]
    assert hub_cache == pod_env(chart.container("worker"))["HF_HUB_CACHE"]
    patterns = next(
        ast.literal_eval(node.value)
        for node in ast.walk(ast.parse(script))
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "patterns"
    )
    for needed in re.findall(r'model_path / "([^"]+)"', (REPO / "router/text.py").read_text()):
        assert any(fnmatch.fnmatch(needed, p) for p in patterns), f"the router reads {needed}"


def test_tokenizer_fetch_lands_in_the_snapshot_folder_the_worker_resolves(tmp_path: Path) -> None:
    (fetch,) = render({"model": {"id": "org/tiny"}}).pod("router")["spec"]["initContainers"]
    script, model_id, revision, _ = fetch["command"][2:]
    commit, repo = "0" * 40, tmp_path / "models--org--tiny"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    # Offline, the hub client answers from this cache, as the worker's own lookup does.
    argv = [sys.executable, "-c", script, model_id, revision, str(tmp_path)]
    env = {"HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", "")}
    printed = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout.strip()
    worker = hub_snapshot(
        model_id, revision=None, token=None, cache_dir=tmp_path, offline=True, patterns=HUB_PATTERNS, what=""
    )
    assert Path(printed) == worker == repo / "snapshots" / commit


# ---- the Dockerfiles ----
