"""Healing from worker loss, with real processes: a worker killed mid-stream fails its requests
within seconds, queued requests wait, /health answers 503 meanwhile, and the same launcher or
router serves the same tokens again once its workers are back; a crash loop still exits non-zero."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from conftest import build_tiny_model
from launcher_process import Launcher, _wait_healthy, free_port, launcher
from prometheus_client.parser import text_string_to_metric_families
from worker_driver import _spawn

from loraxpy.worker.distributed import EXIT_GROUP_BROKEN

pytestmark = pytest.mark.slow

PROMPT = "w5 w17 w3 w250"
LONG = 240  # new tokens: a stream that is still running when its worker is killed
ERROR_WITHIN_S = 10.0
BACK_WITHIN_S = 120.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama (heads split over 2 shards), a word-level tokenizer and a LoRA adapter."""
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM

    path = build_tiny_model("llama", tmp_path_factory.mktemp("heal-llama"))
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 320)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path / "tokenizer.json"))
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(path.parent / "adapters" / "qv")
    return path


def generate(url: str, adapter: str | None = None, timeout: float = 60, **parameters: Any) -> list[int]:
    params = {"max_new_tokens": 12, "details": True, **parameters}
    if adapter:
        params["adapter_id"] = adapter
    r = requests.post(url + "/generate", json={"inputs": PROMPT, "parameters": params}, timeout=timeout)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def kill_mid_stream(url: str, kill: Any) -> str:
    """Starts a long stream, calls `kill` once tokens flow, returns the error the stream ends with."""
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": LONG}}
    with requests.post(url + "/generate_stream", json=body, stream=True, timeout=60) as r:
        lines = (line for line in r.iter_lines() if line.startswith(b"data:"))
        first = json.loads(next(lines)[5:])
        assert first["token"]["id"] >= 0
        kill()
        killed_at = time.monotonic()
        events = [json.loads(line[5:]) for line in lines]
    assert time.monotonic() - killed_at < ERROR_WITHIN_S
    assert events and "error" in events[-1], events[-3:]
    assert len(events) < LONG - 1, "the stream ended early, with an error"
    return str(events[-1]["error"])


def healing_metrics(url: str) -> tuple[float, float, float]:
    """(lorax_heals_total, lorax_healing, lorax_shard_restarts_total) from /metrics."""
    text = requests.get(url + "/metrics", timeout=10).text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return samples["lorax_heals_total"], samples["lorax_healing"], samples["lorax_shard_restarts_total"]


def health_during_healing(url: str) -> int:
    return requests.get(url + "/health", timeout=10).status_code


class Queued(threading.Thread):
    """A request sent while the workers are down: it must wait for them, then be served."""

    def __init__(self, url: str, adapter: str | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.adapter = url, adapter
        self.tokens: list[int] | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.tokens = generate(self.url, self.adapter, timeout=BACK_WITHIN_S)
        except BaseException as e:  # reported by the test
            self.error = e


def wait_for_health(url: str, status: int, within_s: float = BACK_WITHIN_S) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if requests.get(url + "/health", timeout=10).status_code == status:
            return
        time.sleep(0.2)
    raise TimeoutError(f"/health did not answer {status} within {within_s:g} s")


def wait_healthy_again(url: str) -> None:
    wait_for_health(url, 200)


def shard_pids(launcher_pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


# ---- lorax-launcher: a tensor-parallel shard group is restarted whole ---------------------------


@pytest.fixture(scope="module")
def sharded(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    with launcher(
        tiny,
        tmp_path_factory.mktemp("heal-launcher"),
        "--num-shard",
        "2",
        "--adapter-root",
        str(tiny.parent / "adapters"),
        "--adapter-source",
        "local",
        "--max-restarts",
        "2",
    ) as s:
        yield s


def test_a_killed_shard_fails_its_stream_then_the_launcher_restarts_the_group_and_serves_the_same_tokens(
    sharded: Launcher,
) -> None:
    url = sharded.url
    before, before_lora = generate(url), generate(url, "qv")
    assert before != before_lora, "the adapter changes the answer"
    old = shard_pids(sharded.proc.pid)
    assert len(old) == 2
    assert healing_metrics(url) == (0, 0, 0)

    error = kill_mid_stream(url, lambda: os.kill(max(old), signal.SIGKILL))  # one of the two
    assert "generation failed" in error
    assert health_during_healing(url) == 503
    queued, queued_lora = Queued(url), Queued(url, "qv")

    wait_healthy_again(url)
    queued.join(BACK_WITHIN_S)
    queued_lora.join(BACK_WITHIN_S)
    assert queued.error is None and queued.tokens == before
    assert queued_lora.error is None and queued_lora.tokens == before_lora
    assert generate(url) == before
    assert generate(url, "qv") == before_lora
    new = shard_pids(sharded.proc.pid)
    assert len(new) == 2 and not new & old, "every shard of the group was restarted"
    assert sharded.proc.poll() is None
    assert "restarting all 2 shard(s)" in sharded.log()
    assert healing_metrics(url) == (1, 0, 1), "one heal, by one restart of the group"


def test_a_crash_loop_exits_non_zero_after_max_restarts(tiny: Path, tmp_path: Path) -> None:
    with launcher(tiny, tmp_path, "--max-restarts", "1", "--restart-window-s", "600") as s:
        (first,) = shard_pids(s.proc.pid)
        os.kill(first, signal.SIGKILL)
        wait_healthy_again(s.url)
        assert generate(s.url)
        (second,) = shard_pids(s.proc.pid)
        assert second != first
        os.kill(second, signal.SIGKILL)
        assert s.proc.wait(timeout=30) != 0
        assert "giving up" in s.log() and "shard 0 exited" in s.log()


# ---- lorax-router alone: it reconnects to workers that come back ------------------------------


def test_lorax_router_alone_waits_for_its_restarted_worker_pods_and_serves_the_same_tokens(
    tiny: Path, tmp_path: Path
) -> None:
    """Two worker "pods" of one tensor-parallel group: one is killed mid-stream, the other leaves
    the broken group by itself, both come back (as a StatefulSet's pods do) while the router waits."""
    addresses = [f"unix://{tmp_path}/worker-{rank}.sock" for rank in range(2)]
    rendezvous = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}

    def start_workers(tag: str) -> list[subprocess.Popen[bytes]]:
        args = ("--adapter-root", str(tiny.parent / "adapters"), "--kv-cache-memory-mib", "64")
        return [
            _spawn(
                tiny, address, tmp_path / f"worker-{rank}-{tag}.log", args, {**rendezvous, "RANK": str(rank)}
            )
            for rank, address in enumerate(addresses)
        ]

    workers = start_workers("first")
    port = free_port()
    router_cmd = [
        str(Path(sys.executable).parent / "lorax-router"),
        "--worker-addresses",
        ",".join(addresses),
        "--hostname",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch-prefill-tokens",
        "512",
        "--adapter-source",
        "local",
    ]
    log_path = tmp_path / "router.log"
    with open(log_path, "w") as log:
        router = subprocess.Popen(router_cmd, stdout=log, stderr=subprocess.STDOUT)
    handle = Launcher(f"http://127.0.0.1:{port}", router, log_path)
    try:
        _wait_healthy(handle, 120)
        before, before_lora = generate(handle.url), generate(handle.url, "qv")

        error = kill_mid_stream(handle.url, workers[1].kill)
        assert "generation failed" in error
        assert workers[0].wait(timeout=ERROR_WITHIN_S) == EXIT_GROUP_BROKEN, "the survivor leaves the group"
        assert health_during_healing(handle.url) == 503
        queued, queued_lora = Queued(handle.url), Queued(handle.url, "qv")
        time.sleep(2.0)  # the workers stay away a while: the router backs off and keeps trying
        assert health_during_healing(handle.url) == 503
        assert healing_metrics(handle.url) == (0, 1, 0), "healing, and lorax-router restarts nothing"
        assert queued.is_alive() and queued_lora.is_alive(), "queued requests wait for the workers"

        workers = start_workers("again")  # the pods' containers restart
        wait_healthy_again(handle.url)
        queued.join(BACK_WITHIN_S)
        queued_lora.join(BACK_WITHIN_S)
        assert queued.error is None and queued.tokens == before
        assert queued_lora.error is None and queued_lora.tokens == before_lora
        assert generate(handle.url) == before
        assert generate(handle.url, "qv") == before_lora

        # Idle, the rendezvous host (rank 0) dies: the other shard's heartbeat fails and it exits
        # too; the router notices by its probe, with no request to meet the loss, and heals again.
        time.sleep(1.0)  # the last request's release has reached the workers: no step is in flight
        workers[0].kill()
        assert workers[1].wait(timeout=ERROR_WITHIN_S) == EXIT_GROUP_BROKEN, "the survivor leaves the group"
        deadline = time.monotonic() + ERROR_WITHIN_S
        while "does not answer the health probe" not in handle.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "does not answer the health probe" in handle.log()
        assert health_during_healing(handle.url) == 503
        workers = start_workers("third")
        wait_for_health(handle.url, 200)
        assert generate(handle.url) == before
        assert generate(handle.url, "qv") == before_lora, "an adapter idle at the loss loads again on use"
        assert healing_metrics(handle.url) == (2, 0, 0)
        assert router.poll() is None, handle.log()
    finally:
        router.terminate()
        for worker in workers:
            worker.terminate()
        assert router.wait(timeout=30) == 0, handle.log()
        for worker in workers:
            worker.wait(timeout=30)
