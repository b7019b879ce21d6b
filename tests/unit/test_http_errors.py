"""The HTTP layer in process, over loopback: anything unexpected is a generic JSON 500 (the cause
goes to the log), and /health answers 503 once the engine loop has died. Worker failures behind an
adapter load reach clients only as the worker's messages written for users."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer

from loraxpy.router.adapters import AdapterRegistry
from loraxpy.router.engine import Engine
from loraxpy.router.errors import ValidationError
from loraxpy.router.kv_blocks import BlockAllocator
from loraxpy.router.metrics import Metrics
from loraxpy.router.scheduler import Scheduler, SchedulerConfig
from loraxpy.router.server import ServerState, build_app
from loraxpy.router.validation import Limits
from loraxpy.router.worker_client import WorkerError

SECRET = "KeyError: '/opt/models/private/tokenizer.json' at 0x7f3a"


class HealthyWorker:
    async def health(self, timeout: float = 5.0) -> bool:
        return True


class BrokenTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise RuntimeError(SECRET)


async def serve(engine: Engine) -> TestClient[Any, Any]:
    state = ServerState(
        engine=engine,
        tokenizer=BrokenTokenizer(),  # type: ignore[arg-type]
        limits=Limits(max_input_length=100, max_total_tokens=200),
        metrics=Metrics(),
        model_id="m",
        info={},
    )
    client: TestClient[Any, Any] = TestClient(TestServer(build_app(state)))
    await client.start_server()
    return client


def make_engine() -> Engine:
    scheduler = Scheduler(SchedulerConfig(), BlockAllocator(16, 4))
    return Engine(HealthyWorker(), scheduler, frozenset())  # type: ignore[arg-type]


def test_an_unexpected_exception_is_a_generic_json_500_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> list[tuple[int, Any]]:
        engine = make_engine()
        engine.start()
        client = await serve(engine)
        replies = []
        for path in ("/tokenize", "/generate", "/v1/completions"):
            body = {"prompt": "hi"} if path.startswith("/v1/") else {"inputs": "hi"}
            r = await client.post(path, json=body)
            replies.append((r.status, await r.json()))
        await client.close()
        await engine.stop()
        return replies

    with caplog.at_level(logging.ERROR):
        replies = asyncio.run(scenario())
    for status, body in replies:
        assert status == 500 and SECRET not in str(body), body
    assert replies[0][1]["error_type"] == "internal"
    assert replies[2][1]["error"]["type"] == "server_error"
    assert SECRET in caplog.text, "the cause is in the log"


def test_health_answers_503_once_the_engine_loop_is_dead() -> None:
    async def scenario() -> tuple[int, int, Any]:
        engine = make_engine()
        engine.start()
        client = await serve(engine)
        alive = (await client.get("/health")).status
        assert engine._task is not None
        engine._task.cancel()
        await asyncio.sleep(0)
        dead = await client.get("/health")
        result = (alive, dead.status, await dead.json())
        await client.close()
        return result

    alive, dead, body = asyncio.run(scenario())
    assert alive == 200
    assert dead == 503 and "engine" in body["error"]


class FailingLoads:
    """Workers whose adapter loads fail: refused with a message for users, or crashing inside."""

    async def load_adapter(
        self, index: int, adapter_id: str, source: str, api_token: str = "", merge: object = None
    ) -> int:
        if adapter_id == "refused":
            raise WorkerError(
                "LoadAdapter failed", grpc.StatusCode.INVALID_ARGUMENT, "adapter has no LoRA weights"
            )
        raise WorkerError("LoadAdapter failed", grpc.StatusCode.INTERNAL, SECRET)

    async def offload_adapter(self, index: int) -> None:
        pass


def test_adapter_load_errors_keep_messages_for_users_and_hide_internal_ones() -> None:
    async def scenario() -> list[ValidationError]:
        registry = AdapterRegistry(FailingLoads(), 2)  # type: ignore[arg-type]
        errors = []
        for adapter_id in ("refused", "crashes"):
            with pytest.raises(ValidationError) as e:
                await registry.acquire(adapter_id, "local")
            errors.append(e.value)
        return errors

    refused, crashed = asyncio.run(scenario())
    assert "no LoRA weights" in refused.message
    assert SECRET not in crashed.message and "crashes" in crashed.message
