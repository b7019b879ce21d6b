"""Operating the server: API key, JSON logs without secrets, OTLP traces, OpenAPI document."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import openai
import pytest
import requests
from launcher_process import Launcher, _wait_healthy, free_port, launcher
from lorax import Client
from otlp_receiver import OtlpReceiver, attribute_values
from worker_driver import worker_process

from loraxpy.proto import worker_pb2 as pb
from loraxpy.proto import worker_pb2_grpc
from loraxpy.proto.auth import call_metadata, channel_credentials, new_secret

pytestmark = pytest.mark.slow

API_KEY = "sk-test-very-secret-key"


@pytest.fixture(scope="module")
def secured(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory, otlp: OtlpReceiver):
    with launcher(
        default_model_path,
        tmp_path_factory.mktemp("secured"),
        "--api-key",
        API_KEY,
        "--json-output",
        "--otlp-endpoint",
        otlp.url,
    ) as s:
        yield s


def test_api_key_guards_every_route_but_health(secured) -> None:
    assert requests.get(secured.url + "/health", timeout=10).status_code == 200
    for path in ("/info", "/metrics", "/v1/models"):
        r = requests.get(secured.url + path, timeout=10)
        body = r.json()
        message = body["error"]["message"] if path.startswith("/v1/") else body["error"]
        assert r.status_code == 401 and "API key" in message
    wrong = requests.post(
        secured.url + "/generate", json={"inputs": "hi"}, headers={"Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 401 and wrong.json()["error_type"] == "unauthorized"
    ok = Client(secured.url, headers={"Authorization": f"Bearer {API_KEY}"}).generate(
        "Hello", max_new_tokens=4
    )
    assert ok.generated_text


def test_an_api_key_header_that_is_not_utf8_gets_401_not_500(secured) -> None:
    for raw in (b"Bearer \xff\xfe", "Bearer clé".encode(), b"\x80"):
        r = requests.post(secured.url + "/generate", json={"inputs": "hi"}, headers={"Authorization": raw})
        assert r.status_code == 401 and r.json()["error_type"] == "unauthorized", (raw, r.text)
    ok = Client(secured.url, headers={"Authorization": f"Bearer {API_KEY}"}).generate("Hi", max_new_tokens=2)
    assert ok.generated_text


def test_request_spans_reach_the_otlp_receiver(secured, otlp: OtlpReceiver) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    Client(secured.url, headers=headers).generate("Tell me a joke.", max_new_tokens=6)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not {"validation", "queue", "inference"} <= {
        s.name for s in otlp.spans
    }:
        time.sleep(0.2)
    names = {s.name for s in otlp.spans}
    assert {"validation", "queue", "inference"} <= names, names
    roots = [s for s in otlp.spans if s.name.endswith("request")]
    assert roots and any(s.parent_span_id == roots[0].span_id for s in otlp.spans)
    attributes = {kv.key: kv.value for s in roots for kv in s.attributes}
    assert "generated_tokens" in attributes
    assert API_KEY not in str(otlp.spans)
    # OpenAI's `user` is honoured: the request's span carries it as OpenTelemetry's enduser.id
    client = openai.OpenAI(base_url=f"{secured.url}/v1", api_key=API_KEY)
    model = client.models.list().data[0].id
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, user="tenant-42"
    )
    deadline = time.monotonic() + 20
    users: list[str] = []
    while time.monotonic() < deadline and not users:
        users = attribute_values(otlp, "enduser.id")
        time.sleep(0.2)
    assert users == ["tenant-42"]
    with pytest.raises(openai.BadRequestError, match="`user` must be at most 256 characters"):
        client.completions.create(model=model, prompt="Hi", max_tokens=1, user="u" * 257)


def test_logs_are_json_lines_without_secrets(secured) -> None:
    lines = [line for line in secured.log().splitlines() if line.startswith("{")]
    assert lines, "router logs are JSON with --json-output"
    for line in lines:
        assert {"timestamp", "level", "message"} <= json.loads(line).keys()
    assert API_KEY not in secured.log()


def test_openapi_document_describes_every_route(secured) -> None:
    doc = requests.get(secured.url + "/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert doc["openapi"].startswith("3.")
    for path in (
        "/",
        "/generate",
        "/generate_stream",
        "/tokenize",
        "/v1/completions",
        "/v1/chat/completions",
    ):
        assert path in doc["paths"]
    generate = doc["components"]["schemas"]["GenerateParameters"]["properties"]
    assert {"temperature", "adapter_id", "merged_adapters", "return_k_alternatives"} <= generate.keys()


def shard_pids(launcher_pid: int) -> list[int]:
    """The launcher's worker shards: its children running the worker, found in /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            is_worker = b"loraxpy.worker.cli" in (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if parent == launcher_pid and is_worker:
            pids.append(int(stat.parent.name))
    return pids


def test_launcher_shards_answer_only_calls_carrying_this_launchs_secret(secured) -> None:
    if not Path("/proc/self/environ").exists():
        pytest.skip("reads the shard's command line and environment from Linux's /proc")
    (pid,) = shard_pids(secured.proc.pid)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    (secret,) = [e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"WORKER_SECRET=")]
    assert len(secret) >= 40 and not any(secret.encode() in arg for arg in argv)  # `ps` never shows it
    assert secret not in secured.log()
    address = argv[argv.index(b"--listen") + 1].decode()
    assert address.startswith("unix://")
    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Health(pb.HealthRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Health(pb.HealthRequest(), metadata=call_metadata(secret), timeout=10).ready


def test_lorax_router_alone_serves_through_a_worker_on_tcp_with_mutual_tls_and_the_secret(
    default_model_path: Path, tmp_path: Path, tls_files
) -> None:
    """Split pods at their most locked down: the worker on TCP with TLS, accepting only clients
    with a certificate its CA signed and the secret; the router reading the secret from a file."""
    secret, secret_file = new_secret(), tmp_path / "worker-secret"
    secret_file.write_text(secret + "\n")
    address = f"127.0.0.1:{free_port()}"
    server_tls = ("--tls-cert-file", str(tls_files.server_cert), "--tls-key-file", str(tls_files.server_key))
    client_tls = channel_credentials(tls_files.ca, tls_files.client_cert, tls_files.client_key)
    with worker_process(
        default_model_path,
        tmp_path,
        address=address,
        extra_args=(*server_tls, "--tls-client-ca-file", str(tls_files.ca)),
        env={"WORKER_SECRET": secret},
        credentials=client_tls,
    ) as _:
        port = free_port()
        router = Path(sys.executable).parent / "lorax-router"
        log_path = tmp_path / "router.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [
                    str(router),
                    "--worker-addresses",
                    address,
                    "--worker-secret-file",
                    str(secret_file),
                    "--worker-tls-ca-file",
                    str(tls_files.ca),
                    "--worker-tls-cert-file",
                    str(tls_files.client_cert),
                    "--worker-tls-key-file",
                    str(tls_files.client_key),
                    "--hostname",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--max-batch-prefill-tokens",
                    "256",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                handle = Launcher(f"http://127.0.0.1:{port}", proc, log_path)
                _wait_healthy(handle, 120)
                text = (
                    Client(handle.url).generate("The capital of France is", max_new_tokens=5).generated_text
                )
                assert "Paris" in text
                assert secret not in log_path.read_text() + (tmp_path / "worker.log").read_text()
            finally:
                proc.terminate()
                assert proc.wait(timeout=30) == 0
