"""Prefix caching over a real launched server on the tiny Llama: requests that share a long prefix
reuse its KV blocks (the router's metrics say how many) and give HF transformers' and PEFT's greedy
fp32 tokens, as without the cache; nothing is shared across adapters, even when a later adapter
is given the slot index an earlier one had; prompt log-probs and preemption stay exact."""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from conftest import served_tiny_llama_with_adapters, tiny_llama_server
from launcher_process import Launcher
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

BLOCK_SIZE = 16  # the worker's default --block-size
NUM_BLOCKS = 12  # --max-batch-total-tokens 192: small enough that long requests preempt each other


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama (word-level tokenizer: "w7" is token 7) and three random LoRA adapters."""
    qkvo = ("q_proj", "k_proj", "v_proj", "o_proj")
    return served_tiny_llama_with_adapters(
        tmp_path_factory, "prefix", {"a": qkvo, "b": qkvo, "c": qkvo}, seed=50
    )


@pytest.fixture(scope="module")
def server(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    with tiny_llama_server(
        tiny,
        tmp_path_factory,
        "prefix",
        # One slot: each adapter offloads the one before, and a new one takes the index that left.
        *("--max-active-adapters", "1", "--max-batch-total-tokens", str(NUM_BLOCKS * BLOCK_SIZE)),
    ) as s:
        yield s


@pytest.fixture(scope="module")
def reference(tiny: Path) -> Any:
    """Greedy tokens (and prompt log-probs) of HF transformers, with a PEFT adapter when named."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models: dict[str | None, Any] = {}

    def run(prompt: list[int], n: int, adapter: str | None = None) -> tuple[list[int], list[float]]:
        if adapter not in models:
            model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
            if adapter is not None:
                model = PeftModel.from_pretrained(model, tiny.parent / "adapters" / adapter)
            models[adapter] = model
        model = models[adapter]
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, do_sample=False)
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        prompt_logprobs = logprobs.gather(1, ids[0, 1:, None]).squeeze(1).tolist()
        return out[0, len(prompt) :].tolist(), prompt_logprobs

    return run


def words(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def prefix(seed: int, n: int = 40) -> list[int]:
    return random.Random(seed).choices(range(1, 320), k=n)


def generate(url: str, ids: list[int], n: int = 8, adapter: str | None = None, **params: Any) -> dict:
    parameters = {"max_new_tokens": n, "details": True, **params}
    if adapter is not None:
        parameters["adapter_id"] = adapter
    r = requests.post(url + "/generate", json={"inputs": words(ids), "parameters": parameters}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["details"]


def tokens(details: dict) -> list[int]:
    return [t["id"] for t in details["tokens"]]


def counts(url: str) -> dict[str, float]:
    text = requests.get(url + "/metrics", timeout=10).text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return {
        "hits": samples["lorax_prefix_cache_hits_total"],
        "misses": samples["lorax_prefix_cache_misses_total"],
        "preemptions": samples["lorax_preemptions"],
    }


def delta(before: dict[str, float], url: str) -> dict[str, float]:
    after = counts(url)
    return {k: after[k] - before[k] for k in before}


def test_shared_prefix_requests_reuse_its_blocks_and_give_the_uncached_greedy_tokens(
    server: Launcher, reference: Any
) -> None:
    system = prefix(1)  # 40 tokens: two full blocks, then the rest of a block
    prompts = [system + prefix(100 + i, 5) for i in range(4)]
    before = counts(server.url)
    first = tokens(generate(server.url, prompts[0]))
    assert delta(before, server.url) == {"hits": 0, "misses": 2, "preemptions": 0}
    with ThreadPoolExecutor(3) as pool:
        rest = list(pool.map(lambda p: tokens(generate(server.url, p)), prompts[1:]))
    assert delta(before, server.url) == {"hits": 6, "misses": 2, "preemptions": 0}
    for prompt, got in zip(prompts, [first, *rest], strict=True):
        assert got == reference(prompt, 8)[0]
    # Prompt log-probs are computed for every prompt token: such a request takes nothing cached.
    before = counts(server.url)
    details = generate(server.url, prompts[1], decoder_input_details=True)
    assert delta(before, server.url) == {"hits": 0, "misses": 0, "preemptions": 0}
    want_tokens, want_logprobs = reference(prompts[1], 8)
    assert tokens(details) == want_tokens
    got_logprobs = [t["logprob"] for t in details["prefill"][1:]]
    assert got_logprobs == pytest.approx(want_logprobs, abs=1e-4)


def test_adapters_never_share_blocks_even_under_a_reused_slot_index(server: Launcher, reference: Any) -> None:
    system = prefix(2)
    x, y = system + prefix(200, 6), system + prefix(201, 6)
    generate(server.url, x)  # the base model caches the prefix
    before = counts(server.url)
    on_a = tokens(generate(server.url, x, adapter="a"))
    assert delta(before, server.url)["hits"] == 0  # the base model's blocks are not a's
    on_a_y = tokens(generate(server.url, y, adapter="a"))
    assert delta(before, server.url)["hits"] == 2
    on_b = tokens(generate(server.url, y, adapter="b"))  # a is offloaded: its index is free
    on_c = tokens(generate(server.url, y, adapter="c"))  # c is given a's index
    assert delta(before, server.url)["hits"] == 2  # a's blocks are neither b's nor c's
    back_on_a = tokens(generate(server.url, x, adapter="a"))  # offloaded, loaded again: b's index
    assert delta(before, server.url) == {"hits": 4, "misses": 6, "preemptions": 0}
    log = server.log()
    index_of = {name: log.rindex(f"loaded adapter {name} (index ") for name in "abc"}
    assert log[index_of["c"] :].startswith("loaded adapter c (index 1)")  # a's first index
    assert log[index_of["a"] :].startswith("loaded adapter a (index 2)")  # b's
    assert on_a == back_on_a == reference(x, 8, "a")[0]
    assert on_a_y == reference(y, 8, "a")[0]
    assert on_b == reference(y, 8, "b")[0]
    assert on_c == reference(y, 8, "c")[0]
    assert len({tuple(on_a_y), tuple(on_b), tuple(on_c)}) == 3  # the adapters really differ here


def test_preempted_requests_sharing_a_prefix_finish_with_the_greedy_tokens(
    server: Launcher, reference: Any
) -> None:
    system = prefix(3)
    prompts = [system + prefix(300 + i, 5) for i in range(6)]  # 45 + 24 tokens each: 5 blocks
    generate(server.url, prompts[0], n=1)  # caches the prefix: every request below starts after it
    before = counts(server.url)
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda p: tokens(generate(server.url, p, n=24)), prompts))
    change = delta(before, server.url)
    assert change["preemptions"] > 0 and change["hits"] >= 2 * len(prompts)
    for prompt, out in zip(prompts, got, strict=True):
        assert out == reference(prompt, 24)[0]
