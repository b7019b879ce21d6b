"""Workers without adapter slots (--max-loras 0): the router keeps no adapter registry, and a
request naming an adapter gets a 400 at once instead of waiting for a slot that never comes."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from loraxpy.router.config import RouterConfig
from loraxpy.router.engine import Engine
from loraxpy.router.kv_blocks import BlockAllocator
from loraxpy.router.launcher import adapter_registry
from loraxpy.router.metrics import Metrics
from loraxpy.router.scheduler import Scheduler, SchedulerConfig
from loraxpy.router.server import ServerState, build_app
from loraxpy.router.validation import Limits
from loraxpy.router.worker_client import WorkerInfo

INFO = WorkerInfo("m", "/m", "llama", "float32", "cpu", 1, 100, 64, 16, (), "sdpa", num_adapter_slots=4)


class Words:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1 + len(w) for w in text.split()]


def test_a_registry_only_where_every_shard_serves_adapters() -> None:
    async def scenario() -> tuple[Any, Any]:
        engine = Engine(object(), Scheduler(SchedulerConfig(), BlockAllocator(16, 4)), frozenset())  # type: ignore[arg-type]
        with_slots = adapter_registry(
            RouterConfig(), object(), dataclasses.replace(INFO, supports_adapters=True), engine
        )  # type: ignore[arg-type]
        without = adapter_registry(RouterConfig(), object(), INFO, engine)  # type: ignore[arg-type]
        return with_slots, without

    with_slots, without = asyncio.run(scenario())
    assert with_slots is not None and with_slots.num_slots == 4
    assert without is None


def test_a_request_naming_an_adapter_is_refused_at_once() -> None:
    async def scenario() -> tuple[int, Any]:
        scheduler = Scheduler(SchedulerConfig(), BlockAllocator(16, 4))
        engine = Engine(object(), scheduler, frozenset())  # type: ignore[arg-type]
        state = ServerState(
            engine=engine,
            tokenizer=Words(),  # type: ignore[arg-type]
            limits=Limits(max_input_length=100, max_total_tokens=200),
            metrics=Metrics(),
            model_id="m",
            info={},
            adapters=adapter_registry(RouterConfig(), object(), INFO, engine),  # type: ignore[arg-type]
        )
        client: TestClient[Any, Any] = TestClient(TestServer(build_app(state)))
        await client.start_server()
        try:
            body = {"inputs": "a bc", "parameters": {"adapter_id": "some/adapter", "max_new_tokens": 2}}
            response = await asyncio.wait_for(client.post("/generate", json=body), 10)
            return response.status, await response.json()
        finally:
            await client.close()

    status, body = asyncio.run(scenario())
    assert status == 422, body  # a validation error, as LoRAX answers them
    assert "started without adapters" in body["error"]
