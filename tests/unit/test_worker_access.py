"""Who may call a worker: the shared secret on every RPC, (mutual) TLS, and how each process gets
its settings. The gRPC server here is the worker's own `serve()` around a stand-in servicer that
records what reached it; tests/integration/test_worker_behaviour.py repeats the refusals against a
real `lorax-worker`."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from loraxpy.proto import auth, worker_pb2_grpc
from loraxpy.proto import worker_pb2 as pb
from loraxpy.router import launcher
from loraxpy.router.config import RouterConfig
from loraxpy.router.config import parse_args as parse_router_args
from loraxpy.router.worker_client import WorkerClient, WorkerError
from loraxpy.worker import cli
from loraxpy.worker.config import parse_args as parse_worker_args
from loraxpy.worker.server import serve

SECRET = "s3cret-" + "x" * 20
# Each RPC of the Worker service with a request that would change the worker's state if served.
CALLS: dict[str, Any] = {
    "Info": pb.InfoRequest(),
    "Health": pb.HealthRequest(),
    "Warmup": pb.WarmupRequest(max_prefill_tokens=64, num_blocks=4),
    "Step": pb.StepRequest(new_requests=[pb.NewRequest(id=1, token_ids=[1], block_table=[0])]),
    "DownloadAdapter": pb.DownloadAdapterRequest(adapter=pb.AdapterSpec(adapter_id="org/a", source="hub")),
    "LoadAdapter": pb.LoadAdapterRequest(adapter=pb.AdapterSpec(adapter_id="org/a"), adapter_index=1),
    "OffloadAdapter": pb.OffloadAdapterRequest(adapter_index=1),
}
RESPONSES: dict[str, Any] = {
    "Info": pb.InfoResponse(model_type="llama", world_size=1),
    "Health": pb.HealthResponse(ready=True),
    "Warmup": pb.WarmupResponse(num_blocks=4, block_size=16),
    "Step": pb.StepResponse(),
    "DownloadAdapter": pb.DownloadAdapterResponse(),
    "LoadAdapter": pb.LoadAdapterResponse(),
    "OffloadAdapter": pb.OffloadAdapterResponse(),
}


class RecordingServicer(worker_pb2_grpc.WorkerServicer):
    """Answers every RPC with a canned response and records which ones reached it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattribute__(self, name: str) -> Any:
        if name in RESPONSES:

            def handler(request: Any, context: grpc.ServicerContext) -> Any:
                self.calls.append(name)
                return RESPONSES[name]

            return handler
        return super().__getattribute__(name)


def free_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture
def worker() -> Iterator[tuple[RecordingServicer, str]]:
    servicer, address = RecordingServicer(), free_address()
    server = serve(servicer, address, SECRET)  # type: ignore[arg-type]
    yield servicer, address
    server.stop(grace=None)


def call(channel: grpc.Channel, method: str, metadata: tuple[tuple[str, str], ...] | None) -> Any:
    return getattr(worker_pb2_grpc.WorkerStub(channel), method)(CALLS[method], metadata=metadata, timeout=10)


def refusal(
    channel: grpc.Channel, method: str, metadata: tuple[tuple[str, str], ...] | None
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(channel, method, metadata)
    return e.value


BAD_METADATA = {
    "none": None,
    "wrong secret": (("authorization", "Bearer " + "y" * 27),),
    "secret without its scheme": (("authorization", SECRET),),
    "secret with a suffix": (("authorization", f"Bearer {SECRET}x"),),
    "right and wrong together": (("authorization", f"Bearer {SECRET}"), ("authorization", "Bearer no")),
    "secret in another header": (("x-worker-secret", SECRET),),
}


@pytest.mark.parametrize("metadata", BAD_METADATA.values(), ids=BAD_METADATA.keys())
def test_every_rpc_without_the_secret_is_refused_before_it_runs(
    worker: tuple[RecordingServicer, str], metadata: tuple[tuple[str, str], ...] | None
) -> None:
    servicer, address = worker
    with grpc.insecure_channel(address) as channel:
        for method in CALLS:
            e = refusal(channel, method, metadata)
            # The same bare answer whatever was wrong: nothing to learn by probing.
            assert (e.code(), e.details()) == (grpc.StatusCode.UNAUTHENTICATED, auth.REFUSAL), method
    assert servicer.calls == []


def test_every_rpc_with_the_secret_is_served(worker: tuple[RecordingServicer, str]) -> None:
    servicer, address = worker
    with grpc.insecure_channel(address) as channel:
        for method in CALLS:
            assert call(channel, method, auth.call_metadata(SECRET)) == RESPONSES[method]
    assert servicer.calls == list(CALLS)


def test_unknown_methods_are_refused_alike_so_probing_reveals_no_method(
    worker: tuple[RecordingServicer, str],
) -> None:
    _, address = worker
    with grpc.insecure_channel(address) as channel:
        nope = channel.unary_unary("/lorax.worker.v1.Worker/Nope")
        with pytest.raises(grpc.RpcError) as e:
            nope(b"", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            nope(b"", metadata=auth.call_metadata(SECRET), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_refusals_are_logged_at_most_once_per_interval(
    worker: tuple[RecordingServicer, str], caplog: pytest.LogCaptureFixture
) -> None:
    _, address = worker
    with caplog.at_level(logging.WARNING, logger=auth.__name__), grpc.insecure_channel(address) as channel:
        for _ in range(20):
            refusal(channel, "Health", None)
    lines = [r.getMessage() for r in caplog.records if r.name == auth.__name__]
    assert len(lines) == 1 and "refused 1 call" in lines[0]
    assert SECRET not in caplog.text


def test_mutual_tls_needs_a_client_certificate_and_still_the_secret(tls_files: Any) -> None:
    servicer, address = RecordingServicer(), free_address()
    credentials = auth.server_credentials(tls_files.server_cert, tls_files.server_key, tls_files.ca)
    server = serve(servicer, address, SECRET, credentials)  # type: ignore[arg-type]
    try:
        router = auth.channel_credentials(tls_files.ca, tls_files.client_cert, tls_files.client_key)
        with grpc.secure_channel(address, router) as channel:
            assert call(channel, "Info", auth.call_metadata(SECRET)) == RESPONSES["Info"]
            assert refusal(channel, "Info", None).code() == grpc.StatusCode.UNAUTHENTICATED
        no_client_cert = auth.channel_credentials(tls_files.ca)
        for channel in (grpc.secure_channel(address, no_client_cert), grpc.insecure_channel(address)):
            with channel:
                assert (
                    refusal(channel, "Info", auth.call_metadata(SECRET)).code() == grpc.StatusCode.UNAVAILABLE
                )
        assert servicer.calls == ["Info"]
    finally:
        server.stop(grace=None)


def test_worker_client_sends_its_secret_over_tls_and_names_a_mismatch(tls_files: Any) -> None:
    servicer, address = RecordingServicer(), free_address()
    server = serve(
        servicer, address, SECRET, auth.server_credentials(tls_files.server_cert, tls_files.server_key)
    )  # type: ignore[arg-type]

    async def run(secret: str) -> Any:
        tls = auth.channel_credentials(tls_files.ca)
        client = WorkerClient([address], secret=secret, tls=tls, tls_server_name="localhost")
        try:
            return await client.info()
        finally:
            await client.close()

    try:
        assert asyncio.run(run(SECRET)).model_type == "llama"
        with pytest.raises(WorkerError, match="WORKER_SECRET") as e:
            asyncio.run(run("z" * 32))
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and not e.value.is_refusal
        assert servicer.calls == ["Info"]
    finally:
        server.stop(grace=None)


# ---- reading the secret ----


def test_secret_comes_from_the_environment_or_a_file_whose_newline_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    assert auth.read_secret(SECRET, None) == auth.read_secret(None, path) == SECRET
    assert auth.read_secret(None, None) is None and auth.read_secret("", None) is None


@pytest.mark.parametrize(
    "value", ["short", "x" * 15, "with space " + "x" * 16, "ünïcode-" + "x" * 16, "tab\t" + "x" * 16]
)
def test_a_secret_too_short_or_unfit_for_a_header_is_refused(value: str) -> None:
    with pytest.raises(auth.SecretError, match="at least 16"):
        auth.read_secret(value, None)


def test_secret_set_twice_or_an_unreadable_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET)
    with pytest.raises(auth.SecretError, match="not both"):
        auth.read_secret(SECRET, path)
    with pytest.raises(auth.SecretError, match="cannot read") as e:
        auth.read_secret(None, tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(auth.SecretError, match="empty"):
        auth.read_secret(None, tmp_path / "empty")
    assert SECRET not in str(e.value)


def test_each_launch_makes_a_new_long_secret() -> None:
    first, second = auth.new_secret(), auth.new_secret()
    assert first != second and len(first) >= 40
    assert auth.read_secret(first, None) == first


# ---- the worker's settings ----


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("WORKER_SECRET", *launcher.SHARD_ACCESS_ENV, "LORAX_WORKER_LISTEN"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_worker_refuses_a_tcp_port_without_a_secret_unless_told(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="WORKER_SECRET"):
        parse_worker_args(["--listen", "0.0.0.0:50051"])
    assert parse_worker_args(["--listen", "unix:///tmp/w.sock"]).worker_secret is None  # a private socket
    assert parse_worker_args(["--listen", "0.0.0.0:50051", "--allow-unauthenticated"]).allow_unauthenticated
    clean_env.setenv("WORKER_SECRET", SECRET)
    config = parse_worker_args(["--listen", "0.0.0.0:50051"])
    assert config.worker_secret == SECRET and SECRET not in repr(config)


def test_worker_accepts_client_certificates_instead_of_a_secret(
    clean_env: pytest.MonkeyPatch, tls_files: Any
) -> None:
    tls = ["--tls-cert-file", str(tls_files.server_cert), "--tls-key-file", str(tls_files.server_key)]
    config = parse_worker_args(["--listen", "0.0.0.0:1", *tls, "--tls-client-ca-file", str(tls_files.ca)])
    assert (config.worker_secret, config.tls_client_ca_file) == (None, tls_files.ca)
    assert cli.tls(config) is not None
    with pytest.raises(ValueError, match="go together"):
        parse_worker_args(["--listen", "unix:///w.sock", *tls[:2]])
    with pytest.raises(ValueError, match="needs --tls-cert-file"):
        parse_worker_args(["--listen", "unix:///w.sock", "--tls-client-ca-file", str(tls_files.ca)])


def test_the_secret_has_no_flag_and_a_file_works(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_worker_args(["--listen", "unix:///w.sock", "--worker-secret", SECRET])
    assert "WORKER_SECRET" in capsys.readouterr().err
    (tmp_path / "secret").write_text(SECRET)
    config = parse_worker_args(["--listen", "0.0.0.0:1", "--worker-secret-file", str(tmp_path / "secret")])
    assert config.worker_secret == SECRET


def test_worker_exits_before_loading_the_model_when_its_port_would_be_open(
    clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clean_env.setattr(cli, "build_runner", lambda config: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        cli.main(["--listen", "127.0.0.1:50051"])
    assert e.value.code == 2 and "--allow-unauthenticated" in caplog.text


def test_worker_warns_when_secrets_would_cross_the_network_in_clear_text(
    clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clean_env.setenv("WORKER_SECRET", SECRET)
    with caplog.at_level(logging.WARNING):
        cli.warn_about_access(parse_worker_args(["--listen", "0.0.0.0:1"]))
        cli.warn_about_access(parse_worker_args(["--listen", "unix:///w.sock"]))
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["0.0.0.0"]
    assert "clear text" in caplog.text and SECRET not in caplog.text


# ---- the router's and the launcher's settings ----


def test_router_reads_the_secret_from_its_environment_or_a_file_never_a_flag(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_router_args(["--worker-secret", SECRET], prog="lorax-router")
    assert SECRET not in capsys.readouterr().err
    clean_env.setenv("WORKER_SECRET", SECRET)
    config = parse_router_args([], prog="lorax-router")
    assert config.worker_secret == SECRET and SECRET not in repr(config)
    (tmp_path / "secret").write_text(SECRET)
    with pytest.raises(ValueError, match="not both"):
        parse_router_args(["--worker-secret-file", str(tmp_path / "secret")], prog="lorax-router")
    clean_env.delenv("WORKER_SECRET")
    assert parse_router_args(["--worker-secret-file", str(tmp_path / "secret")]).worker_secret == SECRET


def test_router_tls_needs_its_certificate_and_key_together() -> None:
    with pytest.raises(ValueError, match="go together"):
        RouterConfig(worker_tls_cert_file="/router.crt")


def test_launcher_gives_its_shards_the_secret_in_their_environment_only(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spawned: list[tuple[list[str], dict[str, str]]] = []

    def fake_popen(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        spawned.append((cmd, env))
        return None  # type: ignore[return-value]

    clean_env.setattr(subprocess, "Popen", fake_popen)
    clean_env.setenv("WORKER_SECRET_FILE", "/elsewhere")  # the launcher's own shards ignore these
    clean_env.setenv("TLS_CERT_FILE", "/elsewhere.crt")
    launcher.spawn_shards(RouterConfig(num_shard=2), tmp_path, SECRET)
    assert len(spawned) == 2
    for cmd, env in spawned:
        assert env["WORKER_SECRET"] == SECRET and not any(SECRET in arg for arg in cmd)
        assert not launcher.SHARD_ACCESS_ENV & env.keys()
        assert any(arg.startswith("unix://") for arg in cmd)  # private sockets, never TCP
