"""lorax-bench soak against in-process stand-ins: a server that answers well loses nothing; one that
cuts streams, answers errors that are not its API's JSON or drops connections loses requests, and
errors in the documented shape are counted by kind, not lost."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator

import pytest
from aiohttp import web

from loraxpy.bench.soak import DISCONNECTED, LOST, OK, SoakConfig, run_soak, windows

Handler = Callable[[web.Request], object]
OPENAI = ("/v1/completions", "/v1/chat/completions")


async def _lorax(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    params = body["parameters"]
    if params.get("adapter_id") == "busy":
        return web.json_response({"error": "Model is overloaded", "error_type": "overloaded"}, status=429)
    if request.path == "/generate":
        await asyncio.sleep(0.01)
        return web.json_response({"generated_text": "x"})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    n = params["max_new_tokens"]
    for i in range(n):
        await asyncio.sleep(0.002)
        final = i == n - 1
        event = {"token": {"id": i, "text": "x"}, "generated_text": "x" * n if final else None}
        await response.write(b"data:" + json.dumps(event).encode() + b"\n\n")
    return response


async def _openai(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if body["model"] == "busy":
        error = {
            "message": "Model is overloaded",
            "type": "rate_limit_error",
            "param": None,
            "code": "overloaded",
        }
        return web.json_response({"error": error}, status=429)
    if not body.get("stream"):
        return web.json_response({"id": "c", "choices": [{"text": "x", "finish_reason": "length"}]})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(body["max_tokens"]):
        finish = "length" if i == body["max_tokens"] - 1 else None
        chunk = {"choices": [{"index": 0, "text": "x", "finish_reason": finish}]}
        await response.write(b"data:" + json.dumps(chunk).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    return response


async def _broken(request: web.Request) -> web.StreamResponse:
    """Every way of losing a request: a cut stream, an HTML 500, a dropped connection."""
    await request.read()
    if request.path == "/generate":
        return web.Response(status=500, text="<html>Internal Server Error</html>")
    if request.path.startswith("/v1/"):
        assert request.transport is not None
        request.transport.close()
        return web.Response()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b'data:{"token": {"id": 1, "text": "x"}, "generated_text": null}\n\n')
    return response  # ends without the final event


def _serve(routes: dict[str, Handler]) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_post(path, handler)  # type: ignore[arg-type]
    runner = web.AppRunner(app)

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture
def good_url() -> Iterator[str]:
    paths = ("/generate", "/generate_stream")
    yield from _serve({**dict.fromkeys(paths, _lorax), **dict.fromkeys(OPENAI, _openai)})


@pytest.fixture
def broken_url() -> Iterator[str]:
    yield from _serve(dict.fromkeys(("/generate", "/generate_stream", *OPENAI), _broken))


def test_a_sound_server_loses_nothing_and_errors_are_counted_by_kind(good_url: str) -> None:
    config = SoakConfig(
        good_url,
        duration_s=1.5,
        concurrency=4,
        adapter_ids=("", "a", "busy"),
        max_new_tokens=6,
        disconnect_probability=0.3,
        window_s=0.5,
    )
    report = asyncio.run(run_soak(config))
    assert report.num_lost == 0, report.lost_examples
    assert report.outcomes[OK] > 0 and report.outcomes[DISCONNECTED] > 0
    assert report.outcomes["429 overloaded"] > 0  # both APIs' error shapes, one kind
    assert sum(report.outcomes.values()) == report.num_requests
    assert set(report.by_kind) == {
        "generate",
        "generate_stream",
        "completions",
        "completions_stream",
        "chat",
        "chat_stream",
    }
    assert all(counts.get(OK) for counts in report.by_kind.values())
    assert len(report.windows) >= 3
    for w in report.windows:
        if w["completed"]:
            assert w["p50_s"] <= w["p99_s"]
    assert report.num_adapters == 2


def test_cut_streams_non_json_errors_and_dropped_connections_are_lost(broken_url: str) -> None:
    config = SoakConfig(broken_url, duration_s=0.5, concurrency=2, disconnect_probability=0.0, window_s=1)
    report = asyncio.run(run_soak(config))
    assert report.outcomes == {LOST: report.num_requests}
    assert report.num_lost == report.num_requests > 0
    details = " ".join(report.lost_examples)
    assert "HTTP 500" in details or "without its final event" in details or "Error" in details


def test_windows_group_requests_by_when_they_ended() -> None:
    from loraxpy.bench.soak import Outcome

    outs = [Outcome("generate", "", 0.0, ended_s=e, result=r) for e, r in [(0.5, OK), (1.5, OK), (1.7, LOST)]]
    rows = windows(outs, 1.0)
    assert [(r["completed"], r["lost"]) for r in rows] == [(1, 0), (1, 1)]
    assert rows[1]["p50_s"] == pytest.approx(1.5)
