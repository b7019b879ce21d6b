"""Schemathesis fuzzes every route of the server's own /openapi.json against one real launcher: no
answer is a 5xx, every error (a status or an event in a stream) is JSON in its API's documented
error shape, invalid bodies are refused with a 4xx, and the server still answers a normal request
with the right tokens afterwards. The same server started with --api-key is fuzzed briefly with
the key (served as above) and without it (401 in its path's error shape, but for the public routes).

The server runs the tiny random Llama with a word-level tokenizer, a chat template and one LoRA
adapter, with small token limits so that whatever the fuzzer asks for costs milliseconds. The
number of examples per route is bounded (EXAMPLES) so the module stays within about a minute.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from conftest import served_tiny_llama_with_adapters, tiny_llama_server
from hypothesis import HealthCheck, given, settings
from launcher_process import Launcher
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi import checks as openapi_checks

from loraxpy.router.openapi import LORAX_ERROR, PUBLIC_ROUTES, ROUTES

pytestmark = pytest.mark.slow

EXAMPLES = 25  # per route and generation mode: enough to reach every field, small enough for CI
SECURED_EXAMPLES = 5  # per route, with and without the key: the handlers behind it are fuzzed above
API_KEY = "fuzz-api-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "w5 w17 w3"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama, a word-level tokenizer with a chat template, and one LoRA adapter (qv)."""
    return served_tiny_llama_with_adapters(tmp_path_factory, "fuzz", {"qv": ("q_proj", "v_proj")}, seed=7)


LIMITS = ("--max-input-length", "48", "--max-total-tokens", "64", "--max-active-adapters", "2")


@pytest.fixture(scope="module")
def server(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    with tiny_llama_server(tiny, tmp_path_factory, "fuzz", *LIMITS, "--max-concurrent-requests", "64") as s:
        yield s


@pytest.fixture(scope="module")
def secured(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """The same server started with --api-key."""
    with tiny_llama_server(tiny, tmp_path_factory, "fuzz-secured", *LIMITS, "--api-key", API_KEY) as s:
        yield s


def _greedy(url: str) -> list[int]:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "details": True}}
    r = requests.post(url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


@pytest.fixture(scope="module")
def greedy_before(server: Launcher) -> list[int]:
    """The base model's greedy tokens for PROMPT before any fuzzing: the server must still give them after."""
    return _greedy(server.url)


@pytest.fixture(scope="module")
def api_schema(server: Launcher, greedy_before: list[int]) -> Any:
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def _is_error_shape(body: Any, openai: bool) -> bool:
    if openai:
        error = body.get("error") if isinstance(body, dict) else None
        return isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"] != ""
    return (
        isinstance(body, dict)
        and isinstance(body.get("error"), str)
        and isinstance(body.get("error_type"), str)
        and set(LORAX_ERROR["required"]) <= set(body)  # type: ignore[arg-type]
    )


def _header(headers: dict[str, Any], name: str) -> str:
    value = next((v for k, v in headers.items() if k.lower() == name), "")
    return str(value[0] if isinstance(value, list) and value else value)


@schemathesis.check
def errors_are_json_in_the_documented_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """A 4xx/5xx body, and every event of a stream that carries `error`, is its API's error JSON."""
    openai = case.path.startswith("/v1/") or (  # /invocations runs OpenAI's routes for their bodies
        case.path == "/invocations"
        and isinstance(case.body, dict)
        and ({"messages", "prompt", "input"} & case.body.keys())
    )
    shape = "OpenAI's {error: {message, type, param, code}}" if openai else "LoRAX's {error, error_type}"
    content_type = _header(response.headers, "content-type")
    if response.status_code >= 400:
        assert content_type.startswith("application/json"), f"{response.status_code} as {content_type}"
        body = json.loads(response.content)
        assert _is_error_shape(body, openai), f"{response.status_code} body is not {shape}: {body}"
    elif content_type.startswith("text/event-stream"):
        for line in response.content.splitlines():
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[5:])  # every event is JSON
            if "error" in event:
                assert _is_error_shape(event, openai), f"stream error event is not {shape}: {event}"
    return None


CHECKS = [
    not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
    errors_are_json_in_the_documented_shape,
]


# Schemathesis' own pytest fixture support (`from_fixture`) reads a pytest-internal attribute that
# pytest 9 no longer has, so each route's strategy is driven by hypothesis here directly.
@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
@pytest.mark.parametrize("route", sorted(ROUTES), ids=" ".join)
def test_fuzzed_requests_get_no_5xx_and_every_error_is_json_in_the_documented_shape(
    api_schema: Any, route: tuple[str, str], mode: GenerationMode
) -> None:
    method, path = route
    _, body, _, _, _ = ROUTES[route]
    if body is None and mode is GenerationMode.NEGATIVE:
        pytest.skip("a route without a body or parameters has no invalid requests to generate")
    operation = api_schema[path][method.upper()]
    checks = [*CHECKS, openapi_checks.negative_data_rejection] if mode is GenerationMode.NEGATIVE else CHECKS

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,  # the same examples every run: a failure here reproduces
        database=None,
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: Any) -> None:
        case.call_and_validate(timeout=60, checks=checks)

    fuzz()


def _fuzz_every_route(schema: Any, check: Any) -> None:
    """`check(route, case)` on SECURED_EXAMPLES positive examples of every route."""
    for route in sorted(ROUTES):
        _fuzz_route(schema, route, check)


def _fuzz_route(schema: Any, route: tuple[str, str], check: Any) -> None:
    method, path = route

    @settings(
        max_examples=SECURED_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    @given(case=schema[path][method.upper()].as_strategy(generation_mode=GenerationMode.POSITIVE))
    def fuzz(case: Any) -> None:
        check(route, case)

    fuzz()


def test_with_an_api_key_fuzzed_requests_that_carry_it_get_no_5xx_and_errors_in_the_documented_shape(
    secured: Launcher,
) -> None:
    schema = schemathesis.openapi.from_url(secured.url + "/openapi.json", headers=AUTH, timeout=10)

    def check(route: tuple[str, str], case: Any) -> None:
        response = case.call_and_validate(headers=AUTH, timeout=60, checks=CHECKS)
        assert response.status_code != 401, (route, response.text)

    _fuzz_every_route(schema, check)
    assert _greedy_with(secured.url, AUTH)  # the key reaches the handlers: both APIs answer
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
    r = requests.post(secured.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text


def test_with_an_api_key_fuzzed_requests_without_it_get_401_in_the_documented_shape_but_public_routes(
    secured: Launcher,
) -> None:
    schema = schemathesis.openapi.from_url(secured.url + "/openapi.json", headers=AUTH, timeout=10)
    assert requests.get(secured.url + "/openapi.json", timeout=10).status_code == 401

    def check(route: tuple[str, str], case: Any) -> None:
        response = case.call(timeout=60)
        if route in PUBLIC_ROUTES:
            case.validate_response(response, checks=CHECKS)
            assert response.status_code != 401, (route, response.text)
            return
        # The key is checked before a body is read, so a 401 has its path's error shape: OpenAI's
        # under /v1/, LoRAX's elsewhere (SageMaker's /invocations included, whatever body it carries).
        case.validate_response(
            response, checks=[c for c in CHECKS if c is not errors_are_json_in_the_documented_shape]
        )
        assert response.status_code == 401, (route, response.status_code, response.text)
        assert _is_error_shape(response.json(), route[1].startswith("/v1/")), (route, response.text)

    _fuzz_every_route(schema, check)
    assert _greedy_with(secured.url, AUTH)  # and the server still serves with the key


def _greedy_with(url: str, headers: dict[str, str]) -> list[int]:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "details": True}}
    r = requests.post(url + "/generate", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def test_the_document_describes_every_route_the_server_serves(server: Launcher) -> None:
    from types import SimpleNamespace

    from loraxpy.router.server import build_app

    app = build_app(SimpleNamespace(api_key=None))  # type: ignore[arg-type]
    served = {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.resource is not None}
    doc = requests.get(server.url + "/openapi.json", timeout=10).json()
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == served - {("head", path) for _, path in served}
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert "200" in op["responses"] and op["responses"]["200"]["content"], path


def test_the_server_still_serves_the_same_tokens_after_fuzzing(
    server: Launcher, greedy_before: list[int]
) -> None:
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert _greedy(server.url) == greedy_before
    body = {"model": "qv", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
    r = requests.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"
    gauges = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in requests.get(server.url + "/metrics", timeout=10).text.splitlines()
        if line.startswith(("lorax_queue_length ", "lorax_batch_current_size "))
    }
    assert gauges == {"lorax_queue_length": 0, "lorax_batch_current_size": 0}  # nothing left behind
