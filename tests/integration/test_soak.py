"""`lorax-bench soak` for a few seconds on the tiny Llama it launches itself, with three times more
adapters than slots, streaming and not, dropped clients and mixed sampling: nothing is lost, every
route completes requests, nothing stays queued or running afterwards, and the report has latency
per window and the processes' memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_served import build_served_tiny_llama

from loraxpy.bench.cli import main

pytestmark = pytest.mark.slow


def test_a_short_soak_loses_nothing_and_reports_latency_and_memory(tmp_path: Path) -> None:
    model = build_served_tiny_llama(tmp_path / "model")
    output = tmp_path / "soak.json"
    argv = ["soak", "--model-id", str(model), "--num-adapters", "6", "--max-active-adapters", "2"]
    argv += ["--rank", "4", "--kv-cache-mib", "64", "--duration-s", "6", "--window-s", "2"]
    argv += ["--concurrency", "6", "--max-new-tokens", "16", "--disconnect-probability", "0.2"]
    argv += ["--workdir", str(tmp_path / "work"), "--output", str(output)]
    assert main(argv) == 0
    body = json.loads(output.read_text())
    report = body["report"]
    assert report["num_lost"] == 0 and "lost" not in report["outcomes"], report["lost_examples"]
    assert report["outcomes"]["ok"] > 0 and report["outcomes"]["disconnected"] > 0
    assert report["num_adapters"] == 6
    assert all(counts.get("ok") for counts in report["by_kind"].values()), report["by_kind"]
    assert len(report["windows"]) >= 3
    assert all(w["p50_s"] <= w["p99_s"] for w in report["windows"] if w["completed"])
    first, last = report["memory"][0], report["memory"][-1]
    start = report["memory_at_start"]  # before the first request: the warmed-up, idle server
    assert start["at_s"] == 0 and start["worker_mib"][0] > 100
    assert first["router_mib"] > 0 and len(first["worker_mib"]) == 1 and first["worker_mib"][0] > 100
    assert last["at_s"] > first["at_s"]
    assert body["memory_growth"] is not None
    after = report["after"]  # dropped clients left nothing queued or running, no adapter past the slots
    assert after["lorax_queue_length"] == after["lorax_batch_current_size"] == 0, after
    assert after["lorax_adapter_registry_entries"] <= 2, after
    log = (tmp_path / "work" / "server.log").read_text()
    assert "soak-005" in log or "soak-004" in log, "adapters beyond the two slots were loaded"
