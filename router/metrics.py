"""Prometheus metrics with LoRAX's names, in a registry owned by the server (not the global one)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from loraxpy.router.adapters import AdapterRegistry
    from loraxpy.router.engine import Engine
    from loraxpy.router.healing import Healer
    from loraxpy.router.responses import Generation
    from loraxpy.router.shards import ShardGroup

SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.request_count = Counter("lorax_request_count", "Requests received", registry=r)
        self.request_success = Counter("lorax_request_success", "Requests that completed", registry=r)
        self.request_failure = Counter("lorax_request_failure", "Requests that failed", ["err"], registry=r)
        self.duration = Histogram("lorax_request_duration", "End-to-end seconds", buckets=SECONDS, registry=r)
        self.inference = Histogram(
            "lorax_request_inference_duration",
            "Seconds from first step to last token",
            buckets=SECONDS,
            registry=r,
        )
        self.queue = Histogram(
            "lorax_request_queue_duration",
            "Seconds waiting before the first step",
            buckets=SECONDS,
            registry=r,
        )
        self.ttft = Histogram(
            "lorax_request_time_to_first_token_seconds",
            "Seconds to the first token",
            buckets=SECONDS,
            registry=r,
        )
        self.time_per_token = Histogram(
            "lorax_request_mean_time_per_token_duration",
            "Mean seconds per generated token",
            buckets=SECONDS,
            registry=r,
        )
        self.input_length = Histogram(
            "lorax_request_input_length", "Prompt tokens", buckets=TOKENS, registry=r
        )
        self.generated_tokens = Histogram(
            "lorax_request_generated_tokens", "Generated tokens", buckets=TOKENS, registry=r
        )
        self.step_duration = Histogram(
            "lorax_batch_inference_duration", "Seconds per step", buckets=SECONDS, registry=r
        )
        self.router_overhead = Histogram(
            "lorax_router_step_overhead_seconds",
            "Seconds per step spent outside the workers' own step time: scheduling, gRPC, handing out tokens",
            buckets=SECONDS,
            registry=r,
        )
        self.worker_busy = Counter(
            "lorax_worker_busy_seconds",
            "Seconds the workers spent in steps (the slowest shard's time of each): their busy share of "
            "a period is its increase over the period's length",
            registry=r,
        )
        self.overlapped_steps = Gauge(
            "lorax_overlapped_steps_total",
            "Steps sent before the step in flight had answered (--overlap-steps)",
            registry=r,
        )
        self.queue_length = Gauge("lorax_queue_length", "Requests waiting", registry=r)
        self.batch_size = Gauge("lorax_batch_current_size", "Requests running", registry=r)
        self.kv_blocks_used = Gauge("lorax_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_blocks_total = Gauge("lorax_kv_blocks_total", "KV cache blocks", registry=r)
        self.preemptions = Gauge(
            "lorax_preemptions", "Requests preempted so far (recomputed later)", registry=r
        )
        # Per-adapter load, the shape Kubernetes inference gateways read to route LoRA traffic.
        # Label values are adapter indices, never user strings: only adapters with running or waiting
        # requests are listed, and the registry reuses the indices of adapters that left.
        self.adapter_running = Gauge(
            "lorax_adapter_running_requests", "Running requests per adapter", ["adapter"], registry=r
        )
        self.adapter_waiting = Gauge(
            "lorax_adapter_waiting_requests", "Waiting requests per adapter", ["adapter"], registry=r
        )
        self.adapter_entries = Gauge(
            "lorax_adapter_registry_entries",
            "Adapters the router tracks: on the device, loading, or wanted by a request",
            registry=r,
        )
        # Structured output's cost on the router: computing allowed-token masks (mostly on a thread
        # while the loop hands out tokens), and the part of it the engine loop waited for.
        self.grammar_mask_seconds = Gauge(
            "lorax_grammar_mask_seconds_total", "Seconds spent computing allowed-token masks", registry=r
        )
        self.grammar_mask_wait_seconds = Gauge(
            "lorax_grammar_mask_wait_seconds_total",
            "Seconds the engine loop waited for allowed-token masks before sending steps",
            registry=r,
        )
        self.grammar_masks = Gauge(
            "lorax_grammar_masks_total",
            "Allowed-token masks computed (one per constrained request per step)",
            registry=r,
        )
        self.grammar_mask_steps = Gauge(
            "lorax_grammar_mask_steps_total", "Steps that carried allowed-token masks", registry=r
        )
        # Prefix caching (router/kv_blocks.py), counted in KV blocks of admitted requests' prompts.
        self.prefix_cache_hits = Gauge(
            "lorax_prefix_cache_hits_total", "Prompt blocks taken from the prefix cache", registry=r
        )
        self.prefix_cache_misses = Gauge(
            "lorax_prefix_cache_misses_total",
            "Full prompt blocks looked up in the prefix cache and not found (computed)",
            registry=r,
        )
        self.prefix_cache_blocks = Gauge(
            "lorax_prefix_cache_blocks", "KV blocks holding a cached prefix (in use or evictable)", registry=r
        )
        self.prefix_cache_evictions = Gauge(
            "lorax_prefix_cache_evictions_total", "Cached blocks evicted to make room", registry=r
        )
        # Speculative decoding (--speculative-tokens), per adapter index since the start (indices are
        # reused by later adapters, so the label set stays as small as the device's adapter slots).
        self.speculative_proposed = Gauge(
            "lorax_speculative_proposed_tokens_total",
            "Guessed tokens sent to the workers for verification",
            ["adapter"],
            registry=r,
        )
        self.speculative_accepted = Gauge(
            "lorax_speculative_accepted_tokens_total",
            "Guessed tokens the workers accepted (each one a token gained without a step of its own)",
            ["adapter"],
            registry=r,
        )
        self.speculative_acceptance = Gauge(
            "lorax_speculative_acceptance_rate", "Accepted / proposed guessed tokens", ["adapter"], registry=r
        )
        # Healing (router/healing.py, router/shards.py): read from their owners at each scrape.
        self.heals = Gauge(
            "lorax_heals_total", "Times the workers were lost and the router served again", registry=r
        )
        self.healing = Gauge("lorax_healing", "1 while the workers are being healed, else 0", registry=r)
        self.shard_restarts = Gauge(
            "lorax_shard_restarts_total",
            "Times lorax-launcher restarted its shard group (0 for lorax-router, which waits instead)",
            registry=r,
        )
        self.kernel_path = Gauge(
            "lorax_kernel_path",
            "1 for the implementation each fast path runs on (after the workers' startup self-check)",
            ["path", "implementation"],
            registry=r,
        )

    def set_kernel_paths(self, paths: dict[str, str]) -> None:
        """lorax_kernel_path{path, implementation} = 1 for what runs each fast path on the workers."""
        for path, implementation in paths.items():
            self.kernel_path.labels(path=path, implementation=implementation).set(1)

    def watch_healing(self, healer: Healer, shards: ShardGroup | None) -> None:
        """Heals, healing and shard restarts as the healer and the launcher's shard group count them."""
        self.heals.set_function(lambda: healer.num_heals)
        self.healing.set_function(lambda: float(healer.is_healing))
        if shards is not None:
            self.shard_restarts.set_function(lambda: shards.num_restarts)

    def observe_step(self, seconds: float, worker_seconds: float, num_scheduled: int) -> None:
        self.step_duration.observe(seconds)
        self.router_overhead.observe(max(0.0, seconds - worker_seconds))
        self.worker_busy.inc(worker_seconds)

    def observe_success(self, g: Generation) -> None:
        now = time.monotonic()
        self.request_success.inc()
        self.duration.observe(now - g.started)
        self.input_length.observe(g.num_prompt_tokens)
        self.generated_tokens.observe(len(g.events))
        if g.queue_s is not None:
            self.queue.observe(g.queue_s)
        if g.first_token_at is not None:
            self.ttft.observe(g.first_token_at - g.started)
            self.inference.observe(now - g.first_token_at)
            if len(g.events) > 1:
                self.time_per_token.observe((now - g.first_token_at) / (len(g.events) - 1))

    def render(self, engine: Engine, adapters: AdapterRegistry | None = None) -> tuple[bytes, str]:
        if adapters is not None:
            self.adapter_entries.set(len(adapters.entries))
        scheduler = engine.scheduler
        self.queue_length.set(scheduler.num_waiting)
        self.batch_size.set(len(scheduler.running))
        allocator = scheduler.allocator
        self.kv_blocks_total.set(allocator.num_blocks)
        self.kv_blocks_used.set(allocator.num_blocks - allocator.num_free)
        self.preemptions.set(scheduler.num_preemptions)
        self.prefix_cache_hits.set(allocator.num_hits)
        self.prefix_cache_misses.set(allocator.num_misses)
        self.prefix_cache_blocks.set(allocator.num_cached)
        self.prefix_cache_evictions.set(allocator.num_evictions)
        self.overlapped_steps.set(engine.num_overlapped_steps)
        self.grammar_mask_seconds.set(engine.mask_time.seconds)
        self.grammar_mask_wait_seconds.set(engine.mask_time.wait_seconds)
        self.grammar_masks.set(engine.mask_time.num_masks)
        self.grammar_mask_steps.set(engine.mask_time.num_steps)
        for index, proposed in scheduler.num_draft_tokens.items():
            accepted = scheduler.num_accepted_tokens.get(index, 0)
            self.speculative_proposed.labels(str(index)).set(proposed)
            self.speculative_accepted.labels(str(index)).set(accepted)
            self.speculative_acceptance.labels(str(index)).set(accepted / proposed if proposed else 0.0)
        running: dict[int, int] = {}
        for seq in scheduler.running:
            running[seq.adapter_index] = running.get(seq.adapter_index, 0) + 1
        adapters = set(running) | set(scheduler.waiting)
        self.adapter_running.clear()
        self.adapter_waiting.clear()
        for index in adapters:
            self.adapter_running.labels(str(index)).set(running.get(index, 0))
            self.adapter_waiting.labels(str(index)).set(len(scheduler.waiting.get(index, ())))
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
