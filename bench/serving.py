"""`lorax-bench serve`: a running server driven over HTTP by streaming clients with Poisson arrivals.

With `--constrained` the same workload runs twice back to back, unconstrained then constrained to
a JSON schema (structured output), and the report gives the second's throughput as a share of the
first's. With `--shared-system-prompt N` every request starts with the same long system prompt
(about N words): run once with a different first word per request, so no two requests share a
prefix and the prefix cache cannot help (what `--prefix-caching false` computes), then as is;
the report gives the second's TTFT and throughput as ratios of the first's, and the cache hits
the server counted.

Requests arrive at exponentially distributed intervals (rate λ per second), each picks an adapter
from a pool (uniform or Zipf; "" is the base model) and streams `/generate_stream`. Per request it
records the time to first token (TTFT) and the mean time per output token after the first (TPOT);
the report gives their percentiles and the overall output throughput. Start the server yourself
(`lorax-launcher ...`), so the same client measures any deployment.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp


@dataclass(frozen=True)
class ServeConfig:
    url: str
    num_requests: int = 64
    rate: float = 4.0  # mean arrivals per second
    adapter_ids: tuple[str, ...] = ("",)  # "" = the base model
    distribution: str = "uniform"  # or "zipf"
    zipf_s: float = 1.0
    prompt: str = "Write a short story about a lighthouse keeper."
    max_new_tokens: int = 64
    ignore_eos: bool = True  # every request generates max_new_tokens, so runs compare
    api_key: str = ""
    seed: int = 0
    timeout_s: float = 600.0
    # Structured output: LoRAX's response_format sent with every request (None: unconstrained).
    response_format: dict[str, Any] | None = None
    system_prompt: str = ""  # before every request's prompt (the shared-system-prompt workload)
    unique_prefix: bool = False  # a different first word per request: no two share a prefix

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.rate <= 0 or self.max_new_tokens < 1 or not self.adapter_ids:
            raise ValueError("serve needs at least one request, a positive rate, tokens and adapters")
        if self.distribution not in ("uniform", "zipf"):
            raise ValueError("distribution is uniform or zipf")


@dataclass
class RequestRecord:
    adapter_id: str
    sent_s: float  # since the start of the run
    ttft_s: float | None = None
    latency_s: float | None = None
    num_tokens: int = 0
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.latency_s is None or self.num_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.num_tokens - 1)


@dataclass
class ServeReport:
    num_requests: int
    num_failed: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_s: dict[str, float]
    tpot_s: dict[str, float]
    errors: list[str] = field(default_factory=list)
    # From the server's /metrics over the run: mean seconds per step, and the router's share of it
    # (scheduling, gRPC, handing out tokens); None when the server exports no such metrics.
    step_s: float | None = None
    router_overhead_s: float | None = None
    num_steps: float | None = None
    # The workers' step time as a share of the run's wall time, and the steps sent before the step
    # in flight answered (--overlap-steps).
    worker_busy_fraction: float | None = None
    overlapped_steps: float | None = None
    prefix_cache_hits: float | None = None  # KV blocks the server took from its prefix cache
    # Speculative decoding (--speculative-tokens): guessed tokens the server sent and had accepted.
    speculative_proposed: float | None = None
    speculative_accepted: float | None = None
    # Structured output (from /metrics): steps that carried masks, masks they carried, and per such
    # step the router's seconds computing masks and the part its loop waited for (the rest overlapped
    # handing out tokens and scheduling).
    mask_steps: float | None = None
    masks: float | None = None
    mask_s: float | None = None
    mask_wait_s: float | None = None


def percentiles(values: list[float], points: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    """Linearly interpolated percentiles (numpy's default method); empty input gives an empty dict."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {}
    for p in points:
        k = (len(ordered) - 1) * p / 100
        lo = int(k)
        hi = min(lo + 1, len(ordered) - 1)
        out[f"p{p}"] = ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)
    out["mean"] = sum(ordered) / len(ordered)
    return out


# The constrained workload: a JSON array of integers too long to end within any run's tokens, so
# every request still generates exactly max_new_tokens (a mask on every step) and runs compare.
CONSTRAINED_FORMAT: dict[str, Any] = {
    "type": "json_object",
    "schema": {
        "type": "object",
        "properties": {
            "values": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 999},
                "minItems": 4096,
            }
        },
        "required": ["values"],
        "additionalProperties": False,
    },
}


def plan_requests(config: ServeConfig) -> list[tuple[float, str]]:
    """(arrival second, adapter id) for every request: Poisson arrivals, adapters uniform or Zipf."""
    rng = random.Random(config.seed)
    ids = config.adapter_ids
    weights = (
        [1.0 / k**config.zipf_s for k in range(1, len(ids) + 1)] if config.distribution == "zipf" else None
    )
    t, plan = 0.0, []
    for _ in range(config.num_requests):
        t += rng.expovariate(config.rate)
        plan.append((t, rng.choices(ids, weights=weights)[0]))
    return plan


def shared_system_prompt(num_words: int) -> str:
    """A system prompt of about `num_words` words, the same on every call."""
    rule = "Rule {i}: answer the user politely, cite the page you read, and keep each answer short."
    rules: list[str] = []
    while sum(len(r.split()) for r in rules) < num_words:
        rules.append(rule.format(i=len(rules) + 1))
    return "You are a support assistant. " + " ".join(rules) + "\n"


# The copy workload: a passage, then the start of its copy; a model continuing greedily copies it,
# which prompt-lookup speculation guesses from the prompt.
COPY_PASSAGE = (
    "The lighthouse stood on a narrow spit of rock at the mouth of the harbour. Every evening the "
    "keeper climbed the one hundred and twelve steps, trimmed the wick, polished the great lens and "
    "wrote the weather in a leather book: the wind, the state of the sea, the ships that passed. "
    "In winter the storms came from the north and the spray reached the lamp room; in summer the "
    "fishing boats went out at dawn and came back at dusk, and the keeper counted them home."
)


def copy_task_prompt() -> str:
    """The passage, an instruction to copy it, and the copy's first words."""
    start = " ".join(COPY_PASSAGE.split()[:6])
    return f"Text: {COPY_PASSAGE}\n\nCopy the text above exactly.\nCopy: {start}"


def request_prompt(config: ServeConfig, index: int) -> str:
    first = f"Request {index}. " if config.unique_prefix else ""
    return first + config.system_prompt + config.prompt


async def _one(
    session: aiohttp.ClientSession, config: ServeConfig, record: RequestRecord, t0: float, index: int
) -> None:
    params: dict[str, Any] = {"max_new_tokens": config.max_new_tokens, "ignore_eos_token": config.ignore_eos}
    if record.adapter_id:
        params["adapter_id"] = record.adapter_id
    if config.response_format is not None:
        params["response_format"] = config.response_format
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    start = time.perf_counter()
    record.sent_s = start - t0
    try:
        async with session.post(
            f"{config.url.rstrip('/')}/generate_stream",
            json={"inputs": request_prompt(config, index), "parameters": params},
            headers=headers,
        ) as resp:
            if resp.status != 200:
                record.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                body = json.loads(line[5:])
                if "error" in body:
                    record.error = str(body["error"])
                    return
                if body.get("token") is not None:
                    record.num_tokens += 1
                    if record.ttft_s is None:
                        record.ttft_s = time.perf_counter() - start
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        record.error = f"{type(e).__name__}: {e}"
        return
    record.latency_s = time.perf_counter() - start


async def run_serving(config: ServeConfig) -> tuple[ServeReport, list[RequestRecord]]:
    plan = plan_requests(config)
    records = [RequestRecord(adapter_id, arrival) for arrival, adapter_id in plan]
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    connector = aiohttp.TCPConnector(limit=0)  # arrivals, not a pool size, decide concurrency
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        before = await server_metrics(session, config.url)
        t0 = time.perf_counter()

        async def arrive(arrival: float, record: RequestRecord, index: int) -> None:
            await asyncio.sleep(max(0.0, arrival - (time.perf_counter() - t0)))
            await _one(session, config, record, t0, index)

        await asyncio.gather(
            *(arrive(a, r, i) for i, ((a, _), r) in enumerate(zip(plan, records, strict=True)))
        )
        duration = time.perf_counter() - t0
        after = await server_metrics(session, config.url)
    ok = [r for r in records if r.error is None]
    tokens = sum(r.num_tokens for r in ok)
    report = ServeReport(
        num_requests=len(records),
        num_failed=len(records) - len(ok),
        duration_s=duration,
        requests_per_s=len(ok) / duration,
        output_tokens_per_s=tokens / duration,
        ttft_s=percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_s=percentiles([t for r in ok if (t := r.tpot_s) is not None]),
        errors=sorted({r.error for r in records if r.error})[:10],
    )
    steps_before, steps_after = _steps(before), _steps(after)
    if steps_before is not None and steps_after is not None and steps_after[0] > steps_before[0]:
        steps = steps_after[0] - steps_before[0]
        report.step_s = (steps_after[1] - steps_before[1]) / steps
        report.router_overhead_s = (steps_after[2] - steps_before[2]) / steps
        report.num_steps = steps
    if WORKER_BUSY in before and WORKER_BUSY in after:
        report.worker_busy_fraction = (after[WORKER_BUSY] - before[WORKER_BUSY]) / duration
    if OVERLAPPED_STEPS in before and OVERLAPPED_STEPS in after:
        report.overlapped_steps = after[OVERLAPPED_STEPS] - before[OVERLAPPED_STEPS]
    if PREFIX_CACHE_HITS in before and PREFIX_CACHE_HITS in after:
        report.prefix_cache_hits = after[PREFIX_CACHE_HITS] - before[PREFIX_CACHE_HITS]
    mask_steps = after.get(MASK_STEPS, 0.0) - before.get(MASK_STEPS, 0.0)
    if mask_steps > 0:
        report.mask_steps = mask_steps
        report.masks = after.get(MASKS, 0.0) - before.get(MASKS, 0.0)
        report.mask_s = (after.get(MASK_SECONDS, 0.0) - before.get(MASK_SECONDS, 0.0)) / mask_steps
        report.mask_wait_s = (
            after.get(MASK_WAIT_SECONDS, 0.0) - before.get(MASK_WAIT_SECONDS, 0.0)
        ) / mask_steps
    if SPECULATIVE_PROPOSED in after:
        report.speculative_proposed = after[SPECULATIVE_PROPOSED] - before.get(SPECULATIVE_PROPOSED, 0.0)
        report.speculative_accepted = after.get(SPECULATIVE_ACCEPTED, 0.0) - before.get(
            SPECULATIVE_ACCEPTED, 0.0
        )
    return report, records


STEP_METRICS = (
    "lorax_batch_inference_duration_count",
    "lorax_batch_inference_duration_sum",
    "lorax_router_step_overhead_seconds_sum",
)


PREFIX_CACHE_HITS = "lorax_prefix_cache_hits_total"
WORKER_BUSY = "lorax_worker_busy_seconds_total"
OVERLAPPED_STEPS = "lorax_overlapped_steps_total"
# Per adapter on the server (label `adapter`); summed here.
SPECULATIVE_PROPOSED = "lorax_speculative_proposed_tokens_total"
SPECULATIVE_ACCEPTED = "lorax_speculative_accepted_tokens_total"
MASK_STEPS = "lorax_grammar_mask_steps_total"
MASKS = "lorax_grammar_masks_total"
MASK_SECONDS = "lorax_grammar_mask_seconds_total"
MASK_WAIT_SECONDS = "lorax_grammar_mask_wait_seconds_total"
_COUNTERS = (
    PREFIX_CACHE_HITS,
    WORKER_BUSY,
    OVERLAPPED_STEPS,
    MASK_STEPS,
    MASKS,
    MASK_SECONDS,
    MASK_WAIT_SECONDS,
)


async def server_metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The server's step, prefix-cache, speculation and mask counters from one /metrics scrape; {}
    when it has none."""
    try:
        async with session.get(url.rstrip("/") + "/metrics") as response:
            if response.status != 200:
                return {}
            text = await response.text()
    except aiohttp.ClientError:
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in STEP_METRICS or name in _COUNTERS:
            values[name] = float(value)
        family = name.partition("{")[0]
        if family in (SPECULATIVE_PROPOSED, SPECULATIVE_ACCEPTED):
            values[family] = values.get(family, 0.0) + float(value)
    return values


async def step_metrics(session: aiohttp.ClientSession, url: str) -> tuple[float, float, float] | None:
    """(steps, step seconds, router overhead seconds) so far, from the server's /metrics."""
    return _steps(await server_metrics(session, url))


def _steps(values: dict[str, float]) -> tuple[float, float, float] | None:
    if any(n not in values for n in STEP_METRICS):
        return None
    steps, step_s, overhead_s = (values[n] for n in STEP_METRICS)
    return steps, step_s, overhead_s


def format_report(report: ServeReport) -> str:
    def row(name: str, stats: dict[str, float]) -> str:
        cells = "  ".join(f"{k} {v * 1e3:9.2f} ms" for k, v in stats.items())
        return f"{name:>5}  {cells or 'no data'}"

    lines = [
        f"{report.num_requests} requests ({report.num_failed} failed) in {report.duration_s:.1f} s: "
        f"{report.requests_per_s:.2f} req/s, {report.output_tokens_per_s:.1f} output tokens/s",
        row("TTFT", report.ttft_s),
        row("TPOT", report.tpot_s),
    ]
    if report.step_s is not None and report.router_overhead_s is not None:
        lines.append(
            f"steps: {report.step_s * 1e3:.2f} ms each, of which the router's own "
            f"{report.router_overhead_s * 1e3:.2f} ms ({report.router_overhead_s / report.step_s:.0%})"
            + (f", {report.num_steps:.0f} steps" if report.num_steps else "")
        )
    if report.worker_busy_fraction is not None:
        lines.append(
            f"workers busy {report.worker_busy_fraction:.1%} of the wall time"
            + (f"; {report.overlapped_steps:.0f} steps sent ahead" if report.overlapped_steps else "")
        )
    if report.prefix_cache_hits is not None:
        lines.append(f"prefix cache: {report.prefix_cache_hits:.0f} KV blocks reused")
    if report.speculative_proposed:
        accepted = report.speculative_accepted or 0.0
        lines.append(
            f"speculation: {accepted:.0f} of {report.speculative_proposed:.0f} guessed tokens accepted "
            f"({accepted / report.speculative_proposed:.0%})"
        )
    if report.mask_steps and report.mask_s is not None and report.mask_wait_s is not None:
        lines.append(
            f"masks: {report.masks or 0:.0f} in {report.mask_steps:.0f} steps; per step "
            f"{report.mask_s * 1e3:.2f} ms computing them, {report.mask_wait_s * 1e3:.2f} ms of the "
            f"loop's waiting for them"
        )
    lines += [f"error: {e}" for e in report.errors]
    return "\n".join(lines)


def report_dict(config: ServeConfig, report: ServeReport, records: list[RequestRecord]) -> dict[str, Any]:
    return {
        "config": asdict(config),
        "report": asdict(report),
        "requests": [{**asdict(r), "tpot_s": r.tpot_s} for r in records],
    }
