"""The chart's defences for split pods, rendered by Helm and parsed with the real CLI parsers: the
worker secret both pods share, TLS between them, the workers' NetworkPolicy, the operator's adapter
policy on both pods, unprivileged containers on a read-only root, and bounded scratch space."""

from __future__ import annotations

import argparse
import base64
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from test_deploy import (
    FULL_VALUES,
    VALUE_SETS,
    Rendered,
    container_port,
    parse_router,
    parse_worker,
    pod_env,
    render,
)

from loraxpy.proto.adapter_policy import AdapterSettings
from loraxpy.proto.auth import read_secret

COMPONENTS = ("router", "worker")


def containers(chart: Rendered, component: str) -> list[dict[str, Any]]:
    spec = chart.pod(component)["spec"]
    return spec["containers"] + spec.get("initContainers", [])


def secret_ref(container: dict[str, Any], name: str) -> dict[str, str]:
    (entry,) = [e for e in container["env"] if e["name"] == name]
    return entry["valueFrom"]["secretKeyRef"]


# ---- the worker secret ----


@VALUE_SETS
def test_router_and_every_worker_read_the_same_worker_secret_from_a_secret(
    values: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    chart = render(values)
    ref = secret_ref(chart.container("router"), "WORKER_SECRET")
    assert secret_ref(chart.container("worker"), "WORKER_SECRET") == ref
    router = parse_router(chart, monkeypatch)
    assert router.worker_secret == "secret:" + ref["name"]
    for rank in range(chart.values["worker"]["replicas"]):
        assert parse_worker(chart, rank, monkeypatch).worker_secret == router.worker_secret
    generated = [d for d in chart.docs if d["kind"] == "Secret"]
    if values is FULL_VALUES:  # the user's own Secret: the chart makes none
        assert ref == {"name": "worker-auth", "key": "secret"} and generated == []
        return
    (secret,) = generated
    assert secret["metadata"]["name"] == ref["name"]
    value = base64.b64decode(secret["data"][ref["key"]]).decode()
    assert read_secret(value, None) == value and len(value) >= 32 and value.isalnum()


def test_each_install_generates_its_own_worker_secret() -> None:
    def value() -> str:
        (secret,) = [d for d in render({}).docs if d["kind"] == "Secret"]
        return secret["data"]["WORKER_SECRET"]

    assert value() != value()


# ---- TLS between router and workers ----


def tls_mount(chart: Rendered, component: str) -> Path:
    (mount,) = [m for m in chart.container(component)["volumeMounts"] if m["name"] == "worker-tls"]
    assert mount["readOnly"] is True
    volumes = {v["name"]: v for v in chart.pod(component)["spec"]["volumes"]}
    assert volumes["worker-tls"]["secret"] == {"secretName": "worker-tls", "defaultMode": 0o440}
    return Path(mount["mountPath"])


@pytest.mark.parametrize("mutual", [True, False])
def test_worker_tls_secret_gives_workers_their_certificate_and_the_router_the_ca(
    mutual: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    chart = render({"workerTls": {"secretName": "worker-tls", "mutual": mutual}})
    router, worker = parse_router(chart, monkeypatch), parse_worker(chart, 0, monkeypatch)
    path = tls_mount(chart, "worker")
    assert tls_mount(chart, "router") == path
    assert (worker.tls_cert_file, worker.tls_key_file) == (path / "tls.crt", path / "tls.key")
    assert router.worker_tls_ca_file == str(path / "ca.crt")
    if mutual:  # workers accept only clients with a certificate their CA signed: the router's
        assert worker.tls_client_ca_file == path / "ca.crt"
        assert (router.worker_tls_cert_file, router.worker_tls_key_file) == (
            str(path / "tls.crt"),
            str(path / "tls.key"),
        )
    else:
        assert worker.tls_client_ca_file is None and router.worker_tls_cert_file is None


def test_without_a_tls_secret_nothing_claims_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    chart = render({})
    router, worker = parse_router(chart, monkeypatch), parse_worker(chart, 0, monkeypatch)
    assert (worker.tls_cert_file, router.worker_tls_ca_file) == (None, None)
    assert "worker-tls" not in str(chart.pod("router")) + str(chart.pod("worker"))


# ---- the NetworkPolicy ----


def selected_component(chart: Rendered, selector: dict[str, str]) -> str:
    """The one component whose pods carry every label of the selector (it selects no other pods)."""
    (component,) = [c for c in COMPONENTS if selector.items() <= chart.pod(c)["metadata"]["labels"].items()]
    assert "app.kubernetes.io/instance" in selector  # not another release's pods
    return component


def sources(chart: Rendered, policy: dict[str, Any], port: int) -> set[str]:
    """Which of the release's pods the policy lets reach `port` of the pods it selects."""
    found = set()
    for rule in policy["spec"]["ingress"]:
        if "ports" in rule and port not in [p["port"] for p in rule["ports"]]:
            continue
        assert rule.get("from"), "a rule without `from` admits every pod and address"
        for peer in rule["from"]:
            assert list(peer) == ["podSelector"], "only pods of this namespace, by label"
            found.add(selected_component(chart, peer["podSelector"]["matchLabels"]))
    return found


@VALUE_SETS
def test_worker_grpc_port_admits_the_router_and_rendezvous_only_the_workers(values: dict[str, Any]) -> None:
    chart = render(values)
    policy = chart.find("NetworkPolicy", "worker")
    assert selected_component(chart, policy["spec"]["podSelector"]["matchLabels"]) == "worker"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    wc = chart.container("worker")
    grpc, rendezvous = container_port(wc, "grpc"), container_port(wc, "rendezvous")
    # Workers reach each other on every port: NCCL and gloo connect on ports they pick at random.
    assert sources(chart, policy, grpc) == {"router", "worker"}
    assert sources(chart, policy, rendezvous) == {"worker"}
    assert sources(chart, policy, 12345) == {"worker"}
    (router_rule,) = [r for r in policy["spec"]["ingress"] if "ports" in r]
    assert router_rule["ports"] == [{"protocol": "TCP", "port": grpc}]


def test_network_policy_can_be_left_out() -> None:
    assert [
        d for d in render({"networkPolicy": {"enabled": False}}).docs if d["kind"] == "NetworkPolicy"
    ] == []


# ---- the adapter policy ----

# values.yaml's adapters.* key of each AdapterSettings field (proto/adapter_policy.py).
POLICY_VALUES = {
    "allowed_adapter_sources": "allowedSources",
    "allowed_hub_adapters": "allowedHubAdapters",
    "allowed_s3_buckets": "allowedS3Buckets",
    "max_adapter_size_mib": "maxSizeMiB",
    "adapter_disk_cache_mib": "diskCacheMiB",
    "adapter_load_timeout_s": "loadTimeoutS",
    "max_concurrent_adapter_loads": "maxConcurrentLoads",
}
POLICY_SET: dict[str, Any] = {
    "source": "s3",
    "allowedSources": ["s3", "hub"],
    "allowedHubAdapters": ["acme", "meta-llama/Llama-Guard-3-1B"],
    "allowedS3Buckets": ["adapters-prod", "adapters-eval"],
    "maxSizeMiB": 512,
    "diskCacheMiB": 4096,
    "loadTimeoutS": 42.5,
    "maxConcurrentLoads": 3,
}


def as_launcher_pins(router_argv: list[str]) -> AdapterSettings:
    """What lorax-launcher hands each shard (`worker_adapter_args`), parsed by the shard's parser."""
    parser = argparse.ArgumentParser()
    AdapterSettings.add_arguments(parser)
    return AdapterSettings.from_args(parser.parse_args(router_argv))


def test_values_default_to_the_codes_adapter_settings() -> None:
    adapters, defaults = render({}).values["adapters"], AdapterSettings()
    assert set(POLICY_VALUES) == {f.name for f in dataclasses.fields(AdapterSettings)}
    for name, key in POLICY_VALUES.items():
        value = adapters[key]
        assert (",".join(value) if isinstance(value, list) else value) == getattr(defaults, name), key


@pytest.mark.parametrize("adapters", [{}, POLICY_SET], ids=["defaults", "set"])
def test_router_and_every_worker_parse_the_same_adapter_policy(
    adapters: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    chart = render({"adapters": adapters, "worker": {"replicas": 2}})
    router = parse_router(chart, monkeypatch)
    expected = AdapterSettings(
        **{
            # The chart passes sources sorted, as lorax-launcher does.
            name: ",".join(sorted(v) if name == "allowed_adapter_sources" else v)
            if isinstance(v, list)
            else v
            for name, key in POLICY_VALUES.items()
            if (v := adapters.get(key)) is not None
        }
    )
    assert router.adapter_settings() == expected  # defaults: exactly the code's
    assert router.adapter_source == adapters.get("source", "hub")
    policy = router.adapter_policy()
    if adapters:
        assert policy.sources == {"s3", "hub"}
        assert policy.hub_allowed == ("acme", "meta-llama/Llama-Guard-3-1B")
        assert policy.s3_buckets == ("adapters-prod", "adapters-eval")
    else:
        assert policy.sources == {"hub"} and policy.hub_allowed == policy.s3_buckets == ()
    # Every worker enforces the router's policy, sources pinned as lorax-launcher pins its shards.
    pinned = as_launcher_pins(router.worker_adapter_args())
    for rank in range(2):
        worker = parse_worker(chart, rank, monkeypatch).adapter_settings
        assert worker == pinned
        assert worker == dataclasses.replace(
            expected, allowed_adapter_sources=",".join(sorted(policy.sources))
        )


@pytest.mark.parametrize(
    "adapters",
    [{"source": "s3"}, {"allowedSources": ["hub", "s3"]}],
    ids=["s3-source", "s3-allowed"],
)
def test_s3_without_allowed_buckets_fails_at_install_not_at_router_start(adapters: dict[str, Any]) -> None:
    with pytest.raises(Exception, match="allowedS3Buckets"):
        render({"adapters": adapters})


def test_a_wildcard_bucket_list_reaches_both_pods_intact(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"source": "s3", "allowedSources": "s3", "allowedS3Buckets": "*", "allowedHubAdapters": "*"}
    chart = render({"adapters": values})  # a string, as `--set adapters.allowedS3Buckets=*` gives
    router = parse_router(chart, monkeypatch)
    assert (router.allowed_s3_buckets, router.allowed_hub_adapters, router.allowed_adapter_sources) == (
        "*",
        "*",
        "s3",
    )
    worker = parse_worker(chart, 0, monkeypatch).adapter_settings
    assert (worker.allowed_s3_buckets, worker.allowed_hub_adapters, worker.allowed_adapter_sources) == (
        "*",
        "*",
        "s3",
    )


# ---- the containers ----


@VALUE_SETS
def test_every_container_runs_unprivileged_on_a_read_only_root(values: dict[str, Any]) -> None:
    chart = render(values)
    for component in COMPONENTS:
        spec = chart.pod(component)["spec"]
        assert spec["automountServiceAccountToken"] is False
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
        for c in containers(chart, component):
            context = c["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, c["name"]
            assert context["readOnlyRootFilesystem"] is True, c["name"]
            assert context["runAsNonRoot"] is True and not context.get("privileged", False)
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}


def written_paths(c: dict[str, Any]) -> list[Path]:
    """Where a container writes: /tmp and HOME; a worker its caches; the tokenizer fetch its hub cache."""
    env = pod_env(c)
    paths = [Path("/tmp"), Path(env["HOME"])]
    paths += [Path(env[name]) for name in ("LORAX_CACHE", "HF_HUB_CACHE") if name in env]
    if c["name"] == "fetch-tokenizer":
        paths.append(Path(c["command"][-1]))
    return paths


@VALUE_SETS
def test_every_path_the_app_writes_is_a_writable_volume_and_every_emptydir_is_bounded(
    values: dict[str, Any],
) -> None:
    chart = render(values)
    for component in COMPONENTS:
        volumes = chart.pod(component)["spec"]["volumes"]
        for volume in volumes:
            if "emptyDir" in volume:  # a full one evicts its pod instead of filling the node's disk
                assert volume["emptyDir"]["sizeLimit"], volume["name"]
        for c in containers(chart, component):
            writable = [Path(m["mountPath"]) for m in c["volumeMounts"] if not m.get("readOnly")]
            for path in written_paths(c):
                assert any(path == m or m in path.parents for m in writable), f"{c['name']} writes {path}"
    (tmp,) = [v for v in chart.pod("worker")["spec"]["volumes"] if v["name"] == "tmp"]
    assert tmp["emptyDir"] == {"sizeLimit": chart.values["tmp"]["sizeLimit"]}
