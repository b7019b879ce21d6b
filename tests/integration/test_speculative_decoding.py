"""Speculative decoding over a real launched server (--speculative-tokens 4) on the tiny Llama:
concurrent greedy requests of the base model and two adapters, one asking for top tokens (it does
not speculate), under KV memory small enough to preempt, give HF transformers' and PEFT's greedy
tokens and log-probs; a stop sequence landing inside an accepted run ends the text where it ends
without speculation; the metrics count guesses proposed and accepted per adapter; a seeded sampled
request that accepts guesses draws the same tokens alone and beside other requests; an adapter
shipping Medusa heads guesses with them (over gRPC) instead of by prompt lookup, tokens unchanged."""

from __future__ import annotations

import random
import shutil
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
from test_medusa_heads import write_heads

pytestmark = pytest.mark.slow

BLOCK_SIZE = 16
NUM_BLOCKS = 14  # 224 tokens: four requests of about 70 preempt each other


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama (word-level tokenizer: "w7" is token 7) and two random LoRA adapters."""
    qvo = ("q_proj", "v_proj", "o_proj")
    path = served_tiny_llama_with_adapters(tmp_path_factory, "spec", {"a": qvo, "b": qvo}, seed=70)
    adapters = path.parent / "adapters"
    shutil.copytree(adapters / "a", adapters / "a-medusa")  # adapter a with random Medusa heads
    write_heads(adapters / "a-medusa", path, num_heads=3, num_layers=1, own_out=True, seed=71)
    return path


@pytest.fixture(scope="module")
def server(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    with tiny_llama_server(
        tiny,
        tmp_path_factory,
        "spec",
        *("--speculative-tokens", "4", "--max-batch-total-tokens", str(NUM_BLOCKS * BLOCK_SIZE)),
    ) as s:
        yield s


@pytest.fixture(scope="module")
def reference(tiny: Path) -> Any:
    """HF transformers' greedy tokens and their log-probs, with a PEFT adapter when named."""
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
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0]
            logprobs = torch.log_softmax(model(out[None, :-1]).logits[0].float(), -1)
        new = out[len(prompt) :]
        return new.tolist(), logprobs[len(prompt) - 1 :].gather(1, new[:, None]).squeeze(1).tolist()

    return run


def words(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def generate(url: str, ids: list[int], n: int, adapter: str | None = None, **params: Any) -> dict:
    parameters = {"max_new_tokens": n, "details": True, **params}
    if adapter is not None:
        parameters["adapter_id"] = adapter
    r = requests.post(url + "/generate", json={"inputs": words(ids), "parameters": parameters}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def speculation(url: str) -> dict[str, dict[str, float]]:
    """Proposed and accepted guesses per adapter label."""
    text = requests.get(url + "/metrics", timeout=10).text
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            for key in ("proposed", "accepted"):
                if s.name == f"lorax_speculative_{key}_tokens_total":
                    out.setdefault(s.labels["adapter"], {})[key] = s.value
    return out


def copying_prompt(seed: int) -> list[int]:
    """A random phrase said three times and begun a fourth: text that repeats, as copying does."""
    phrase = random.Random(seed).choices(range(1, 320), k=9)
    return phrase * 3 + phrase[:3]


def test_concurrent_requests_of_adapters_give_the_greedy_tokens_with_guesses(
    server: Launcher, reference: Any
) -> None:
    plan = [(copying_prompt(1), None, 0), (copying_prompt(2), "a", 0), (copying_prompt(3), "b", 0)]
    plan += [(copying_prompt(4), "a", 2), (copying_prompt(5), None, 0)]  # top tokens: no guesses
    n = 40
    with ThreadPoolExecutor(len(plan)) as pool:
        outs = list(
            pool.map(
                lambda p: generate(
                    server.url, p[0], n, p[1], top_n_tokens=p[2] or None, decoder_input_details=False
                ),
                plan,
            )
        )
    for (prompt, adapter, _), out in zip(plan, outs, strict=True):
        want_tokens, want_logprobs = reference(prompt, n, adapter)
        got = out["details"]["tokens"]
        assert [t["id"] for t in got] == want_tokens, f"adapter {adapter}"
        assert [t["logprob"] for t in got] == pytest.approx(want_logprobs, abs=1e-4)
    stats = speculation(server.url)
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples}
    assert samples["lorax_preemptions"] > 0  # the KV cache was too small for all of them at once
    # The base model (index 0) and the adapters guessed, and some guesses were right.
    assert {"0", "1"} <= set(stats)
    assert all(s["accepted"] > 0 and s["proposed"] >= s["accepted"] for s in stats.values()), stats


def test_a_stop_sequence_inside_an_accepted_run_ends_the_text_there(server: Launcher, reference: Any) -> None:
    prompt = copying_prompt(7)  # the tiny model falls into repeating one token from its 13th on
    full = generate(server.url, prompt, 30)
    tokens = full["details"]["tokens"]
    assert [t["id"] for t in tokens] == reference(prompt, 30)[0]
    assert len({t["id"] for t in tokens[12:30]}) == 1
    before = speculation(server.url)["0"]["accepted"]
    # Four of the repeated tokens: without speculation the text ends where they first appear,
    # inside the run of guesses that loop is accepted in.
    stop = "".join(t["text"] for t in tokens[12:16])
    text, m = "", 0
    while stop not in text:
        text += tokens[m]["text"]
        m += 1
    out = generate(server.url, prompt, 30, stop=[stop])
    assert out["details"]["finish_reason"] == "stop_sequence"
    assert [t["id"] for t in out["details"]["tokens"]] == [t["id"] for t in tokens[:m]]
    assert out["generated_text"] == text
    assert speculation(server.url)["0"]["accepted"] >= before + m - 12  # the loop was guessed


def test_a_seeded_sampled_request_gives_the_same_tokens_alone_and_in_a_batch(server: Launcher) -> None:
    prompt = copying_prompt(7)  # greedy, the tiny model repeats one token; sampled, often
    params = {"do_sample": True, "temperature": 0.2, "seed": 11}
    before = speculation(server.url)["0"]["accepted"]
    alone = generate(server.url, prompt, 24, **params)["details"]["tokens"]
    assert speculation(server.url)["0"]["accepted"] > before  # sampled tokens accepted guesses
    with ThreadPoolExecutor(3) as pool:
        others = [pool.submit(generate, server.url, copying_prompt(9 + i), 24) for i in range(2)]
        batched = generate(server.url, prompt, 24, **params)["details"]["tokens"]
        for other in others:
            other.result()
    assert [t["id"] for t in batched] == [t["id"] for t in alone]
    assert [t["logprob"] for t in batched] == pytest.approx([t["logprob"] for t in alone], abs=1e-4)


def test_an_adapter_with_medusa_heads_guesses_with_them_and_keeps_its_tokens(
    server: Launcher, reference: Any
) -> None:
    """The same LoRA with and without random Medusa heads, one request each on a copying prompt:
    prompt lookup guesses that text mostly right, the random heads mostly wrong, so the heads'
    guesses, not prompt lookup's, were verified; the tokens are PEFT's either way."""
    prompt, n = copying_prompt(12), 32
    want = reference(prompt, n, "a")[0]
    ratios = []
    for adapter in ("a", "a-medusa"):
        before = speculation(server.url)
        got = generate(server.url, prompt, n, adapter)["details"]["tokens"]
        assert [t["id"] for t in got] == want, adapter
        after = speculation(server.url)
        proposed, accepted = (
            sum(s.get(key, 0.0) for s in after.values()) - sum(s.get(key, 0.0) for s in before.values())
            for key in ("proposed", "accepted")
        )
        assert proposed > 0, adapter
        ratios.append(accepted / proposed)
    lookup, heads = ratios
    assert lookup > 0.3 and heads < 0.1, ratios  # here: 0.44 and 0.0
