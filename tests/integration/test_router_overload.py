"""Overload and shutdown against a real launcher: a bounded queue wait answered with 503 and
Retry-After, a flood of distinct bad adapter ids that leaves nothing behind, and SIGTERM draining
requests in flight. One server for the module; the SIGTERM test stops it, so it runs last."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
import requests
import torch
from launcher_process import Launcher, launcher
from lorax import Client
from lorax.errors import OverloadedError
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save_file

pytestmark = pytest.mark.slow

SLOTS = 2
# short enough that the KV test's holder (64 tokens of the default model) outlasts it: at 2 s a
# faster decode (about 35 ms a token here) let it finish first and the waiting request was served
MAX_QUEUE_TIME_S = 1
KV_TOKENS = 512  # --max-batch-total-tokens: small, so one long request can hold most of the cache
PROMPT = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"


def write_adapter(folder: Path, model: Path, seed: int) -> None:
    """A random rank-4 PEFT LoRA on q_proj and v_proj, large enough to change greedy answers."""
    config = json.loads((model / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for target, out in (("q_proj", hidden), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(4, hidden, generator=g) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, 4, generator=g) * 0.1
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    peft = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps({**peft, "task_type": "CAUSAL_LM"}))


@pytest.fixture(scope="module")
def server(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    root = tmp_path_factory.mktemp("overload-adapters")
    for seed, name in enumerate("abc"):
        write_adapter(root / name, default_model_path, seed)
    with launcher(
        default_model_path,
        tmp_path_factory.mktemp("overload-launcher"),
        "--adapter-root",
        str(root),
        "--adapter-source",
        "local",
        "--max-active-adapters",
        str(SLOTS),
        "--max-queue-time-s",
        str(MAX_QUEUE_TIME_S),
        "--max-batch-total-tokens",
        str(KV_TOKENS),
        "--shutdown-grace-period-s",
        "30",
        "--waiting-served-ratio",  # admit at once: only a full cache or a busy slot makes a request wait
        "0",
    ) as s:
        yield s


def greedy(server: Launcher, adapter_id: str | None) -> str:
    params = {"max_new_tokens": 8, "adapter_id": adapter_id}
    r = requests.post(server.url + "/generate", json={"inputs": PROMPT, "parameters": params}, timeout=60)
    assert r.status_code == 200, r.text
    return str(r.json()["generated_text"])


def adapter_series(server: Launcher) -> dict[str, float]:
    """Every sample of the per-adapter gauges and the registry's size, by name and labels."""
    text = requests.get(server.url + "/metrics", timeout=10).text
    return {
        f"{s.name}{sorted(s.labels.items())}": s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("lorax_adapter_")
    }


def in_flight(server: Launcher) -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return samples["lorax_queue_length"] + samples["lorax_batch_current_size"]


class Stream:
    """A streaming /generate_stream request held open in a thread until `close`."""

    def __init__(self, server: Launcher, adapter_id: str | None, max_new_tokens: int, inputs: str = PROMPT):
        params = {"max_new_tokens": max_new_tokens, "adapter_id": adapter_id, "ignore_eos_token": True}
        self.response = requests.post(
            server.url + "/generate_stream",
            json={"inputs": inputs, "parameters": params},
            stream=True,
            timeout=120,
        )
        assert self.response.status_code == 200, self.response.text
        self.lines = self.response.iter_lines()
        self.events: list[dict] = []
        self.next_event()  # in a step: it holds its adapter's slot and its KV blocks

    def next_event(self) -> dict:
        for line in self.lines:
            if line.startswith(b"data:"):
                self.events.append(json.loads(line[5:]))
                return self.events[-1]
        raise AssertionError("the stream ended")

    def finish(self) -> list[dict]:
        while "generated_text" not in self.events[-1] or self.events[-1]["generated_text"] is None:
            self.next_event()
        return self.events

    def close(self) -> None:
        self.response.close()


def test_a_flood_of_distinct_missing_adapters_leaves_nothing_and_adapters_answer_as_before(
    server: Launcher,
) -> None:
    before = {name: greedy(server, name) for name in (None, "a", "b", "c")}  # 3 adapters over 2 slots
    assert len(set(before.values())) == 4, before  # each adapter changes the answer: a mix-up shows

    async def flood(n: int) -> list[tuple[int, dict]]:
        sem = asyncio.Semaphore(8)
        async with aiohttp.ClientSession() as session:

            async def one(i: int) -> tuple[int, dict]:
                body = {"inputs": "x", "parameters": {"max_new_tokens": 1, "adapter_id": f"missing-{i}"}}
                async with sem, session.post(server.url + "/generate", json=body) as r:
                    return r.status, await r.json()

            return await asyncio.gather(*(one(i) for i in range(n)))

    started = time.monotonic()
    replies = asyncio.run(flood(1000))
    flood_s = time.monotonic() - started
    assert {status for status, _ in replies} == {404}
    assert all(body["error_type"] == "not_found" for _, body in replies)
    series = adapter_series(server)
    # Nothing lasting: the registry holds at most the adapters left on the device, and no
    # per-adapter series remains for the ids (labels are indices of adapters with requests only).
    assert series["lorax_adapter_registry_entries[]"] <= SLOTS, series
    assert [k for k in series if "adapter_running" in k or "adapter_waiting" in k] == [], series

    # Adapters cycle through indices freed by the flood and by each other, and each still answers
    # with its own weights; a request running on a reused index shows it in the metrics' labels.
    after = {name: greedy(server, name) for name in ("c", "a", None, "b")}
    assert after == {name: before[name] for name in after}
    stream = Stream(server, "b", 64)
    try:
        labels = [k for k in adapter_series(server) if k.startswith("lorax_adapter_running_requests")]
        indices = [int(k.split("'adapter', '")[1].split("'")[0]) for k in labels]
        assert indices and max(indices) <= SLOTS + 8 + 3, labels  # not one of a thousand new indices
    finally:
        stream.close()
    print(f"1000 distinct missing adapter ids in {flood_s:.1f} s")


def test_a_request_that_waits_for_an_adapter_slot_past_max_queue_time_gets_503_with_retry_after(
    server: Launcher,
) -> None:
    holders = [Stream(server, "a", 300), Stream(server, "b", 300)]  # both slots busy for seconds
    try:
        started = time.monotonic()
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "adapter_id": "c"}}
        r = requests.post(server.url + "/generate", json=body, timeout=60)
        waited = time.monotonic() - started
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"] == "1"
        assert r.json()["error_type"] == "overloaded" and "queue" in r.json()["error"]
        assert MAX_QUEUE_TIME_S <= waited < MAX_QUEUE_TIME_S + 5
        with pytest.raises(OverloadedError):  # lorax-client reads the LoRAX body
            Client(server.url, timeout=60).generate(PROMPT, max_new_tokens=4, adapter_id="c")
        oa = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            oa.completions.create(model="c", prompt=PROMPT, max_tokens=4)
        assert e.value.status_code == 503 and e.value.response.headers["Retry-After"] == "1"
        assert e.value.code == "overloaded"
        base = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}
        assert requests.post(server.url + "/generate", json=base, timeout=60).status_code == 200  # no wait
    finally:
        for s in holders:
            s.close()
    assert greedy(server, "c")  # once the slots are free, c is served


def test_a_request_that_waits_for_kv_blocks_past_max_queue_time_gets_503(server: Launcher) -> None:
    def tokens(text: str) -> int:
        ids = requests.post(server.url + "/tokenize", json={"inputs": text}, timeout=10).json()
        assert isinstance(ids, list), ids
        return len(ids)

    long_prompt = "one two three four five six seven eight nine ten " * 50
    while tokens(long_prompt) > KV_TOKENS - 80:  # leaves too few free blocks for the next prompt
        long_prompt = long_prompt[: int(len(long_prompt) * 0.9)]
    holder = Stream(server, None, 64, inputs=long_prompt)
    try:
        body = {"inputs": "word " * 120, "parameters": {"max_new_tokens": 4}}
        r = requests.post(server.url + "/generate", json=body, timeout=60)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
        assert r.json()["error_type"] == "overloaded"
        assert len(holder.finish()) == 64  # the request in the cache was not disturbed
    finally:
        holder.close()
    assert requests.post(server.url + "/generate", json=body, timeout=60).status_code == 200


def test_sigterm_drains_requests_in_flight_refuses_new_ones_with_503_and_exits_0(server: Launcher) -> None:
    """Runs last: it stops the module's server."""
    results: list[requests.Response] = []

    def generate() -> None:
        params = {"max_new_tokens": 40, "ignore_eos_token": True, "details": True}
        body = {"inputs": PROMPT, "parameters": params}
        results.append(requests.post(server.url + "/generate", json=body, timeout=120))

    threads = [threading.Thread(target=generate) for _ in range(3)]
    for t in threads:
        t.start()
    stream = Stream(server, "a", 40)  # also in flight: a streamed request on an adapter
    deadline = time.monotonic() + 30
    while in_flight(server) < 4:  # every request reached the server before the signal
        assert time.monotonic() < deadline, "requests did not arrive"
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while requests.get(server.url + "/health", timeout=10).status_code != 503:  # draining now
        assert time.monotonic() < deadline, "/health still answers 200 after SIGTERM"
        time.sleep(0.05)
    refused = requests.post(server.url + "/generate", json={"inputs": PROMPT}, timeout=10)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "5", refused.text
    assert refused.json()["error_type"] == "unavailable"
    events = stream.finish()
    assert len(events) == 40 and events[-1]["details"]["generated_tokens"] == 40
    for t in threads:
        t.join(timeout=60)
    assert [r.status_code for r in results] == [200, 200, 200], [r.text for r in results]
    assert all(r.json()["details"]["generated_tokens"] == 40 for r in results)
    assert server.proc.wait(timeout=60) == 0, server.log()
    assert "draining" in server.log()
