"""lorax-bench serve against an in-process stand-in for /generate_stream: arrivals, TTFT/TPOT, errors."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from loraxpy.bench.cli import main
from loraxpy.bench.serving import (
    CONSTRAINED_FORMAT,
    ServeConfig,
    format_report,
    percentiles,
    plan_requests,
    run_serving,
)

FIRST_TOKEN_S = 0.05
PER_TOKEN_S = 0.01


FORMATS: list[object] = []  # each request's response_format (None: unconstrained)
INPUTS: list[str] = []  # each request's prompt


async def _stream(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    params = body["parameters"]
    FORMATS.append(params.get("response_format"))
    INPUTS.append(body["inputs"])
    if params.get("adapter_id") == "broken":
        return web.json_response(
            {"error": "adapter broken not found", "error_type": "validation"}, status=422
        )
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await asyncio.sleep(FIRST_TOKEN_S)
    n = params["max_new_tokens"]
    for i in range(n):
        if i:
            await asyncio.sleep(PER_TOKEN_S)
        event = {"token": {"id": i, "text": "x", "logprob": 0.0, "special": False}, "generated_text": None}
        await response.write(b"data:" + json.dumps(event).encode() + b"\n\n")
    return response


STEPS = {"n": 0}


async def _metrics(request: web.Request) -> web.Response:
    """Grows by 10 steps of 20 ms (5 ms of them the router's; 4 masks computed in 2 ms, 0.5 ms of it
    waited for) per scrape."""
    STEPS["n"] += 10
    n = STEPS["n"]
    lines = [
        "# TYPE lorax_batch_inference_duration histogram",
        f"lorax_batch_inference_duration_count {n}.0",
        f"lorax_batch_inference_duration_sum {n * 0.02}",
        f"lorax_router_step_overhead_seconds_sum {n * 0.005}",
        f"lorax_prefix_cache_hits_total {n * 3}.0",
        f'lorax_speculative_proposed_tokens_total{{adapter="0"}} {n * 4}.0',
        f'lorax_speculative_proposed_tokens_total{{adapter="1"}} {n * 2}.0',
        f'lorax_speculative_accepted_tokens_total{{adapter="0"}} {n * 3}.0',
        f"lorax_grammar_mask_steps_total {n}.0",
        f"lorax_grammar_masks_total {n * 4}.0",
        f"lorax_grammar_mask_seconds_total {n * 0.002}",
        f"lorax_grammar_mask_wait_seconds_total {n * 0.0005}",
    ]
    return web.Response(text="\n".join(lines) + "\n")


@pytest.fixture
def server_url() -> Iterator[str]:
    """The stand-in server on its own event loop in a thread; the client under test runs its own loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = web.Application()
    app.router.add_post("/generate_stream", _stream)
    app.router.add_get("/metrics", _metrics)
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


def test_poisson_plan_has_the_requested_rate_and_zipf_favours_the_first_adapter() -> None:
    config = ServeConfig(
        "http://x", num_requests=4000, rate=50.0, adapter_ids=("a", "b", "c"), distribution="zipf", zipf_s=2.0
    )
    plan = plan_requests(config)
    arrivals = [t for t, _ in plan]
    assert arrivals == sorted(arrivals)
    assert arrivals[-1] / len(arrivals) == pytest.approx(1 / 50.0, rel=0.1)
    counts = {a: sum(1 for _, x in plan if x == a) for a in "abc"}
    assert counts["a"] > counts["b"] > counts["c"] > 0


def test_percentiles_interpolate() -> None:
    stats = percentiles([4.0, 1.0, 3.0, 2.0])
    assert stats["p50"] == 2.5 and stats["mean"] == 2.5
    assert stats["p90"] == pytest.approx(3.7)
    assert percentiles([]) == {}


def test_streams_are_timed_and_failures_counted(server_url: str) -> None:
    config = ServeConfig(
        server_url, num_requests=12, rate=200.0, adapter_ids=("", "good", "broken"), max_new_tokens=5
    )
    report, records = asyncio.run(run_serving(config))
    broken = [r for r in records if r.adapter_id == "broken"]
    assert broken and all(r.error and "422" in r.error for r in broken)
    assert report.num_failed == len(broken)
    ok = [r for r in records if r.error is None]
    assert ok and all(r.num_tokens == 5 for r in ok)
    for r in ok:
        assert r.ttft_s is not None and r.ttft_s >= FIRST_TOKEN_S * 0.9
        assert r.tpot_s is not None and r.tpot_s >= PER_TOKEN_S * 0.9
    assert report.ttft_s["p50"] <= report.ttft_s["p99"]
    assert report.output_tokens_per_s == pytest.approx(5 * len(ok) / report.duration_s)
    assert report.step_s == pytest.approx(0.02) and report.router_overhead_s == pytest.approx(0.005)
    assert report.mask_steps == 10 and report.masks == 40
    assert report.mask_s == pytest.approx(0.002) and report.mask_wait_s == pytest.approx(0.0005)
    assert "masks: 40 in 10 steps; per step 2.00 ms computing them, 0.50 ms" in format_report(report)


def test_cli_serve_writes_json(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    argv = [
        "serve",
        f"--url={server_url}",
        "--num-requests=3",
        "--rate=100",
        "--max-new-tokens=2",
        f"--output={out}",
    ]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["report"]["num_requests"] == 3 and doc["report"]["num_failed"] == 0
    assert all(r["num_tokens"] == 2 for r in doc["requests"])


def test_cli_serve_constrained_runs_the_workload_again_under_a_json_schema(
    server_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "serve.json"
    FORMATS.clear()
    argv = ["serve", f"--url={server_url}", "--num-requests=3", "--rate=100", "--max-new-tokens=2"]
    assert main([*argv, "--constrained", f"--output={out}"]) == 0
    assert FORMATS == [None] * 3 + [CONSTRAINED_FORMAT] * 3
    doc = json.loads(out.read_text())
    assert doc["constrained"]["config"]["response_format"] == CONSTRAINED_FORMAT
    assert doc["constrained"]["report"]["num_failed"] == 0
    ratio = doc["constrained"]["report"]["output_tokens_per_s"] / doc["report"]["output_tokens_per_s"]
    assert doc["constrained_throughput_ratio"] == pytest.approx(ratio)


def test_cli_serve_shared_system_prompt_runs_it_unshared_then_shared(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    INPUTS.clear()
    argv = ["serve", f"--url={server_url}", "--num-requests=3", "--rate=100", "--max-new-tokens=2"]
    assert main([*argv, "--shared-system-prompt=60", "--prompt=Hi", f"--output={out}"]) == 0
    plain, unshared, shared = INPUTS[:3], INPUTS[3:6], INPUTS[6:]
    assert plain == ["Hi"] * 3
    system = shared[0].removesuffix("Hi")
    assert shared == [system + "Hi"] * 3 and 60 <= len(system.split()) < 80
    assert sorted(unshared) == [f"Request {i}. {system}Hi" for i in range(3)]  # no prefix in common
    doc = json.loads(out.read_text())["shared_system_prompt"]
    runs = {k: doc[k]["report"] for k in ("unshared", "shared")}
    assert doc["ttft_p50_ratio"] == pytest.approx(
        runs["shared"]["ttft_s"]["p50"] / runs["unshared"]["ttft_s"]["p50"]
    )
    assert doc["throughput_ratio"] == pytest.approx(
        runs["shared"]["output_tokens_per_s"] / runs["unshared"]["output_tokens_per_s"]
    )
    assert runs["shared"]["prefix_cache_hits"] == 30  # the stand-in's counter: 3 per step, 10 steps a scrape


def test_cli_serve_copy_task_sends_a_passage_and_the_start_of_its_copy_and_reports_guesses(
    server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "serve.json"
    INPUTS.clear()
    argv = ["serve", f"--url={server_url}", "--num-requests=2", "--rate=100", "--max-new-tokens=2"]
    assert main([*argv, "--copy-task", f"--output={out}"]) == 0
    text, copy = INPUTS[0].split("\n\nCopy the text above exactly.\nCopy: ")
    assert (
        len(set(INPUTS)) == 1
        and len(INPUTS) == 2
        and text.removeprefix("Text: ").startswith(copy)
        and len(text) > 200
    )
    report = json.loads(out.read_text())["report"]
    # The stand-in's counters, summed over adapters: 6 and 3 per step, 10 steps a scrape.
    assert (report["speculative_proposed"], report["speculative_accepted"]) == (60, 30)
    assert "speculation: 30 of 60 guessed tokens accepted (50%)" in capsys.readouterr().out
