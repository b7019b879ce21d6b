"""`lorax-bench soak`: a server held at saturation for a set time, and whether it loses anything.

`concurrency` clients each send one request after another until the duration is up: LoRAX's
`/generate` and `/generate_stream` and OpenAI's `/v1/completions` (streamed or not), each naming
one of many adapters (or the base model), with mixed sampling parameters (greedy, temperature with
top-p or top-k, repetition penalty, a seed) and lengths; some clients hang up on purpose, mid
stream or before the answer. Every request ends in exactly one of:

- `ok`: a complete answer (a body, or a stream that ended with its final event);
- `disconnected`: the client hung up on purpose (the server must release it);
- an error kind: an error status or a stream's error event in the API's documented error shape,
  counted by status and `error_type` (LoRAX) or `type` (OpenAI), e.g. `429 overloaded`;
- `lost`: anything else — a connection reset, a timeout, a stream cut without its final event,
  a body that is not the API's JSON. A sound server loses nothing.

The report gives requests by outcome, and per time window the completed requests with their
p50/p99 latency, plus the resident memory of the router and its worker processes before the
first request, at the end of each window (the first one is the warm-up) and at the end.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlparse

import aiohttp
import psutil

from loraxpy.bench.serving import percentiles

LOST = "lost"
OK = "ok"
DISCONNECTED = "disconnected"
KINDS = ("generate", "generate_stream", "completions", "completions_stream", "chat", "chat_stream")
# What the server holds once the clients are gone: all zero but the KV blocks a prefix cache keeps.
IDLE_GAUGES = ("lorax_queue_length", "lorax_batch_current_size", "lorax_adapter_registry_entries")


@dataclass(frozen=True)
class SoakConfig:
    url: str
    duration_s: float = 60.0
    concurrency: int = 32
    adapter_ids: tuple[str, ...] = ("",)  # "" = the base model
    max_new_tokens: int = 32  # each request asks for 1..max_new_tokens
    disconnect_probability: float = 0.1
    window_s: float = 10.0
    prompt: str = "Write a short story about a lighthouse keeper."
    api_key: str = ""
    seed: int = 0
    request_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.concurrency < 1 or self.max_new_tokens < 1 or self.window_s <= 0:
            raise ValueError("soak needs a positive duration, window, concurrency and max_new_tokens")
        if not 0 <= self.disconnect_probability <= 1 or not self.adapter_ids:
            raise ValueError("disconnect probability is in [0, 1] and the adapter pool is not empty")


@dataclass
class Outcome:
    kind: str  # which route and whether streamed (KINDS)
    adapter_id: str
    started_s: float  # since the start of the run
    ended_s: float = 0.0
    result: str = LOST  # OK, DISCONNECTED, LOST or an error kind ("429 overloaded")
    detail: str = ""  # what made it lost or an error, for the log

    @property
    def latency_s(self) -> float:
        return self.ended_s - self.started_s


@dataclass
class MemorySample:
    at_s: float
    router_mib: float
    worker_mib: list[float]


@dataclass
class SoakReport:
    duration_s: float
    num_requests: int
    outcomes: dict[str, int]  # ok, disconnected, lost and each error kind
    num_lost: int
    windows: list[dict[str, Any]]  # start_s, completed, errors, p50_s, p99_s
    memory: list[MemorySample] = field(default_factory=list)  # after each window, and at the end
    memory_at_start: MemorySample | None = None  # before the first request
    lost_examples: list[str] = field(default_factory=list)
    num_adapters: int = 0
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)  # route kind → outcome → count
    # IDLE_GAUGES from /metrics once the server settled after the run (None: no /metrics): requests
    # dropped by their clients must not stay queued or running, adapters must not stay registered.
    after: dict[str, float] | None = None

    def memory_growth(self) -> dict[str, float] | None:
        """Router and workers' RSS growth from the first sample (after warm-up) to the last, as shares."""
        if len(self.memory) < 2:
            return None
        first, last = self.memory[0], self.memory[-1]
        return {
            "router": last.router_mib / first.router_mib - 1,
            "workers": sum(last.worker_mib) / max(sum(first.worker_mib), 1e-9) - 1,
        }


def _sampling(rng: random.Random) -> dict[str, Any]:
    """One of the mixes clients send: greedy, temperature with top-p or top-k, a penalty, a seed."""
    choice = rng.randrange(4)
    if choice == 0:
        return {}
    params: dict[str, Any] = {"temperature": round(rng.uniform(0.3, 1.5), 2)}
    if choice == 1:
        params["top_p"] = round(rng.uniform(0.5, 0.95), 2)
    elif choice == 2:
        params["top_k"] = rng.randint(1, 50)
    else:
        params["repetition_penalty"] = round(rng.uniform(1.0, 1.3), 2)
    if rng.random() < 0.5:
        params["seed"] = rng.randrange(2**31)
    return params


def _request(
    config: SoakConfig, kind: str, adapter_id: str, rng: random.Random
) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of one request of `kind`."""
    n = rng.randint(1, config.max_new_tokens)
    sampling = _sampling(rng)
    if kind.startswith("generate"):
        params: dict[str, Any] = {"max_new_tokens": n, **sampling}
        if "temperature" in sampling:
            params["do_sample"] = True
        if adapter_id:
            params["adapter_id"] = adapter_id
        return "/" + kind, {"inputs": config.prompt, "parameters": params}
    body: dict[str, Any] = {"model": adapter_id, "max_tokens": n, **sampling}
    if kind.endswith("stream"):
        body["stream"] = True
    if kind.startswith("chat"):
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": config.prompt}]}
    return "/v1/completions", {**body, "prompt": config.prompt}


def _error_kind(status: int | None, body: Any, openai: bool) -> str | None:
    """`<status> <kind>` for a body in the API's error shape; None when the body is not one."""
    prefix = f"{status} " if status is not None else "stream "
    if openai:
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return prefix + str(error.get("code") or error.get("type"))
        return None
    if (
        isinstance(body, dict)
        and isinstance(body.get("error"), str)
        and isinstance(body.get("error_type"), str)
    ):
        return prefix + body["error_type"]
    return None


async def _read_stream(
    resp: aiohttp.ClientResponse, out: Outcome, openai: bool, hang_up_after: int | None
) -> None:
    """Reads SSE events until the final one; hangs up after `hang_up_after` events when asked to."""
    events = 0
    async for line in resp.content:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            out.result = OK if openai and out.detail == "finished" else LOST
            if out.result == LOST:
                out.detail = "[DONE] before any finished choice"
            return
        event = json.loads(data)
        if "error" in event:
            kind = _error_kind(None, event, openai)
            out.result, out.detail = (kind, "") if kind else (LOST, f"malformed error event {event}")
            return
        events += 1
        if openai and any(c.get("finish_reason") for c in event.get("choices", [])):
            out.detail = "finished"
        elif not openai and event.get("generated_text") is not None:
            out.result = OK
            return
        if hang_up_after is not None and events >= hang_up_after:
            out.result = DISCONNECTED
            return
    out.detail = "the stream ended without its final event"


async def _one(session: aiohttp.ClientSession, config: SoakConfig, out: Outcome, rng: random.Random) -> None:
    path, body = _request(config, out.kind, out.adapter_id, rng)
    openai = path.startswith("/v1/")
    hang_up = rng.random() < config.disconnect_probability
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    url = config.url.rstrip("/") + path
    try:
        if hang_up and not out.kind.endswith("stream"):  # gives up waiting for a whole answer
            try:
                async with asyncio.timeout(rng.uniform(0.01, 0.5)):
                    await _send(session, url, body, headers, out, openai, None)
                return
            except TimeoutError:
                out.result = DISCONNECTED
                return
        await _send(session, url, body, headers, out, openai, rng.randint(1, 4) if hang_up else None)
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError, UnicodeDecodeError) as e:
        out.result, out.detail = LOST, f"{type(e).__name__}: {e}"


async def _send(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    out: Outcome,
    openai: bool,
    hang_up_after: int | None,
) -> None:
    async with session.post(url, json=body, headers=headers) as resp:
        if resp.status != 200:
            text = await resp.text()
            try:
                kind = _error_kind(resp.status, json.loads(text), openai)
            except json.JSONDecodeError:
                kind = None
            out.result, out.detail = (kind, "") if kind else (LOST, f"HTTP {resp.status}: {text[:200]}")
        elif resp.content_type == "text/event-stream":
            await _read_stream(resp, out, openai, hang_up_after)
        else:
            answer = await resp.json()
            whole = answer.get("choices") if openai else answer.get("generated_text")
            out.result, out.detail = (OK, "") if whole is not None else (LOST, f"no answer in {answer}")


def server_processes(url: str) -> tuple[psutil.Process, list[psutil.Process]] | None:
    """The process listening on the URL's port (the router, inside lorax-launcher) and its child
    processes (the launcher's worker shards); None when no local process listens there."""
    port = urlparse(url).port or 80
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            router = psutil.Process(conn.pid)
            return router, router.children(recursive=True)
    return None


def memory_sample(
    at_s: float, procs: tuple[psutil.Process, list[psutil.Process]] | None
) -> MemorySample | None:
    if procs is None:
        return None
    router, workers = procs
    try:
        return MemorySample(
            at_s, router.memory_info().rss / 2**20, [w.memory_info().rss / 2**20 for w in workers]
        )
    except psutil.Error:
        return None


async def run_soak(config: SoakConfig) -> SoakReport:
    rng = random.Random(config.seed)
    outcomes: list[Outcome] = []
    memory: list[MemorySample] = []
    procs = server_processes(config.url)
    at_start = memory_sample(0.0, procs)
    timeout = aiohttp.ClientTimeout(total=config.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=0)
    t0 = time.perf_counter()

    async def client(seed: int) -> None:
        crng = random.Random(seed)
        while time.perf_counter() - t0 < config.duration_s:
            out = Outcome(crng.choice(KINDS), crng.choice(config.adapter_ids), time.perf_counter() - t0)
            outcomes.append(out)
            await _one(session, config, out, crng)
            out.ended_s = time.perf_counter() - t0

    async def sample_memory() -> None:
        while True:
            await asyncio.sleep(config.window_s)
            if (sample := memory_sample(time.perf_counter() - t0, procs)) is not None:
                memory.append(sample)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        sampler = asyncio.ensure_future(sample_memory())
        await asyncio.gather(*(client(rng.randrange(2**32)) for _ in range(config.concurrency)))
        sampler.cancel()
        after = await settled_gauges(session, config)
    duration = time.perf_counter() - t0
    if (last := memory_sample(duration, procs)) is not None:
        memory.append(last)
    counts = Counter(o.result for o in outcomes)
    return SoakReport(
        duration_s=duration,
        num_requests=len(outcomes),
        outcomes=dict(counts.most_common()),
        num_lost=counts[LOST],
        windows=windows(outcomes, config.window_s),
        memory=memory,
        memory_at_start=at_start,
        lost_examples=[f"{o.kind} {o.adapter_id!r}: {o.detail}" for o in outcomes if o.result == LOST][:10],
        num_adapters=len({a for a in config.adapter_ids if a}),
        by_kind={k: dict(Counter(o.result for o in outcomes if o.kind == k)) for k in KINDS},
        after=after,
    )


async def settled_gauges(
    session: aiohttp.ClientSession, config: SoakConfig, timeout_s: float = 10.0
) -> dict[str, float] | None:
    """IDLE_GAUGES once no request is queued or running (or as they are after `timeout_s`)."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    deadline = time.perf_counter() + timeout_s
    gauges: dict[str, float] | None = None
    while True:
        try:
            async with session.get(config.url.rstrip("/") + "/metrics", headers=headers) as resp:
                text = await resp.text() if resp.status == 200 else ""
        except aiohttp.ClientError:
            return gauges
        values = dict(
            line.split(" ", 1) for line in text.splitlines() if line.split(" ", 1)[0] in IDLE_GAUGES
        )
        if len(values) != len(IDLE_GAUGES):
            return gauges
        gauges = {name: float(v) for name, v in values.items()}
        if gauges["lorax_queue_length"] == gauges["lorax_batch_current_size"] == 0:
            return gauges
        if time.perf_counter() > deadline:
            return gauges
        await asyncio.sleep(0.2)


def windows(outcomes: list[Outcome], window_s: float) -> list[dict[str, Any]]:
    """Per window of `window_s` by the time requests ended: completed, errors, p50/p99 latency."""
    if not outcomes:
        return []
    num = int(max(o.ended_s for o in outcomes) // window_s) + 1
    rows = []
    for i in range(num):
        ended = [o for o in outcomes if int(o.ended_s // window_s) == i]
        ok = [o.latency_s for o in ended if o.result == OK]
        stats = percentiles(ok, (50, 99))
        rows.append(
            {
                "start_s": i * window_s,
                "completed": len(ok),
                "errors": sum(1 for o in ended if o.result not in (OK, DISCONNECTED, LOST)),
                "lost": sum(1 for o in ended if o.result == LOST),
                "p50_s": stats.get("p50"),
                "p99_s": stats.get("p99"),
            }
        )
    return rows


def format_soak(report: SoakReport) -> str:
    lines = [
        f"{report.num_requests} requests over {report.num_adapters} adapters in {report.duration_s:.0f} s: "
        f"{report.num_lost} lost",
        "outcomes: " + ", ".join(f"{k} {v}" for k, v in report.outcomes.items()),
        *(f"  {kind}: " + ", ".join(f"{k} {v}" for k, v in c.items()) for kind, c in report.by_kind.items()),
        f"{'window':>8} {'completed':>9} {'errors':>6} {'lost':>4} {'p50 ms':>9} {'p99 ms':>9}",
    ]
    for w in report.windows:
        p50 = f"{w['p50_s'] * 1e3:9.0f}" if w["p50_s"] is not None else f"{'-':>9}"
        p99 = f"{w['p99_s'] * 1e3:9.0f}" if w["p99_s"] is not None else f"{'-':>9}"
        lines.append(f"{w['start_s']:>7.0f}s {w['completed']:>9} {w['errors']:>6} {w['lost']:>4} {p50} {p99}")
    if report.memory:
        first, last = report.memory[0], report.memory[-1]
        start = report.memory_at_start
        before = (
            f"{start.router_mib:.0f} at start, " if start else "",
            f"{sum(start.worker_mib):.0f} at start, " if start else "",
        )
        lines.append(
            f"RSS router {before[0]}{first.router_mib:.0f} → {last.router_mib:.0f} MiB, workers "
            f"{before[1]}{sum(first.worker_mib):.0f} → {sum(last.worker_mib):.0f} MiB "
            f"(from {first.at_s:.0f} s to {last.at_s:.0f} s)"
        )
    if report.after is not None:
        lines.append("after the run: " + ", ".join(f"{k} {v:g}" for k, v in report.after.items()))
    lines += [f"lost: {e}" for e in report.lost_examples]
    return "\n".join(lines)


def soak_dict(config: SoakConfig, report: SoakReport) -> dict[str, Any]:
    return {"config": asdict(config), "report": asdict(report), "memory_growth": report.memory_growth()}
