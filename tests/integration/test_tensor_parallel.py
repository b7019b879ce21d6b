"""Tensor parallelism on CPU (gloo): sharded workers give the tokens of one shard, HF and PEFT."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import requests
from conftest import build_tiny_model
from launcher_process import launcher
from lorax import AsyncClient, Client
from structured_schemas import SCHEMAS
from test_medusa_heads import reference_guesses, write_heads
from test_multi_lora_api import save_adapter
from test_worker_lora import INDEX, load, make_adapters, peft_greedy
from test_worker_matches_transformers import assert_matches_hf, make_requests
from worker_driver import Driver, Request, sharded_workers

from loraxpy.proto import worker_pb2 as pb
from loraxpy.proto.sampling import SamplingParams

pytestmark = pytest.mark.slow


# The other families run over one and two shards in test_model_families (Qwen2 and Mistral over one),
# with a mixed batch of PEFT adapters and prompt log-probs.
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_two_shards_match_transformers(kind: str, tmp_path: Path) -> None:
    path = build_tiny_model(kind, tmp_path / kind)
    with sharded_workers(path, tmp_path, 2) as stubs:
        info = stubs[1].Info(pb.InfoRequest())
        assert (info.rank, info.world_size) == (1, 2)
        for f in [
            s.Warmup.future(pb.WarmupRequest(max_prefill_tokens=64, max_num_seqs=8, num_blocks=64))
            for s in stubs
        ]:
            f.result()
        requests_ = Driver(stubs, num_blocks=64, block_size=16, step_token_budget=64, chunk_size=7).run(
            make_requests(info.vocab_size, prompt_logprobs=True)
        )
    assert_matches_hf(path, requests_)


def test_two_shards_serve_a_mixed_batch_of_adapters_like_peft(tmp_path: Path) -> None:
    base = build_tiny_model("llama", tmp_path / "llama")
    root = tmp_path / "adapters"
    make_adapters(base, root)
    # Medusa heads through the LM head, which this adapter's LoRA adapts and the shards split.
    shutil.copytree(root / "head-r4", root / "head-r4-medusa")
    heads = write_heads(root / "head-r4-medusa", base, num_heads=2, num_layers=2, own_out=False, seed=9)
    with sharded_workers(base, tmp_path, 2, extra_args=("--adapter-root", str(root))) as stubs:
        for f in [
            s.Warmup.future(pb.WarmupRequest(max_prefill_tokens=64, max_num_seqs=8, num_blocks=64))
            for s in stubs
        ]:
            f.result()
        for name, index in INDEX.items():
            for s in stubs:
                load(s, index, name)
        names = [None, *INDEX]
        batch = [
            Request(
                id=i + 1,
                prompt=[3 + i, 14, 15, 92, 65, 35],
                max_new_tokens=8,
                adapter_index=INDEX[n] if n else 0,
            )
            for i, n in enumerate(names)
        ]
        Driver(stubs, num_blocks=64, block_size=16, step_token_budget=64).run(batch)
        medusa_index = len(INDEX) + 1
        for s in stubs:
            load(s, medusa_index, "head-r4-medusa")
        prompt = [9, 11, 40, 2, 77]
        new = pb.NewRequest(
            id=99,
            token_ids=prompt,
            num_prompt_tokens=len(prompt),
            params=SamplingParams().to_proto(),
            adapter_index=medusa_index,
            block_table=[0],
            num_scheduled_tokens=len(prompt),
        )
        step = pb.StepRequest(new_requests=[new], num_proposed_tokens=2)
        replies = [f.result() for f in [s.Step.future(step) for s in stubs]]
    for name, r in zip(names, batch, strict=True):
        assert r.generated == peft_greedy(base, root, name, r.prompt, 8), name
    # Every shard proposes the heads' guesses after the first token, as one computes them.
    token = replies[0].outputs[0].token.token_id
    want = reference_guesses(base, root, "head-r4-medusa", heads, [*prompt, token])[len(prompt) - 1]
    assert [tuple(r.outputs[0].proposed_draft_tokens) for r in replies] == [want, want]


def test_heads_that_do_not_split_are_refused_at_startup(tmp_path: Path) -> None:
    path = build_tiny_model("mistral", tmp_path / "mistral")  # one KV head
    with (
        pytest.raises(RuntimeError, match="does not divide evenly over 2 shards"),
        sharded_workers(path, tmp_path, 2),
    ):
        pass


SYSTEM = (
    "<|im_start|>system\nYou are a careful geography teacher. Answer every question in one short "
    "sentence, name the country, and never add anything the student did not ask for.<|im_end|>\n"
)


def test_default_model_over_three_shards_matches_one(default_model_path: Path, tmp_path: Path) -> None:
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    # Prefix caching over shards: the second prompt starts after the first one's cached blocks on
    # every shard; one shard without the cache gives the same tokens. Speculative decoding too:
    # every shard verifies the same guesses alike (the answer copies "capital of France"), and
    # the constrained requests beside them do not speculate.
    shared = [SYSTEM + q for q in (prompt, prompt.replace("France", "Italy"))]
    save_adapter(default_model_path, tmp_path / "adapters" / JSON_ADAPTER, 8, 16, ["q_proj", "v_proj"], 5)
    adapters = ("--adapter-root", str(tmp_path / "adapters"), "--adapter-source", "local")
    with launcher(
        default_model_path, tmp_path, "--num-shard", "3", "--speculative-tokens", "4", *adapters
    ) as s:
        info = requests.get(s.url + "/info", timeout=10).json()
        assert info["num_shards"] == 3
        assert info["quantize"] is None and len(info["weight_bytes_per_shard"]) == 3
        sharded = Client(s.url).generate(prompt, max_new_tokens=20, details=True)
        sharded_json = constrained(s.url)
        before = cache_hits(s.url)
        sharded_shared = [
            Client(s.url, timeout=120).generate(p, max_new_tokens=8).generated_text for p in shared
        ]
        assert cache_hits(s.url) - before == 2  # the 43 tokens both share: two full blocks of 16
        assert metric(s.url, 'lorax_speculative_accepted_tokens_total{adapter="0"}') > 0
    with launcher(default_model_path, tmp_path, "--prefix-caching", "false", *adapters) as s:
        single = Client(s.url).generate(prompt, max_new_tokens=20, details=True)
        single_json = constrained(s.url)
        single_shared = [
            Client(s.url, timeout=120).generate(p, max_new_tokens=8).generated_text for p in shared
        ]
        assert cache_hits(s.url) == 0
    assert sharded_shared == single_shared
    assert [t.id for t in sharded.details.tokens] == [t.id for t in single.details.tokens]
    assert sharded.generated_text == "The capital of France is Paris."
    # Structured output: every shard applies the same mask, so three shards write what one does,
    # with an adapter too (which changes what the model writes inside the grammar).
    assert sharded_json == single_json
    for (name, _, _), (text, finish) in zip(CONSTRAINED, sharded_json, strict=True):
        assert finish == "eos_token", (name, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])
    assert sharded_json[0][0] != sharded_json[-1][0]  # "nested" greedy, without and with the adapter


def cache_hits(url: str) -> float:
    return metric(url, "lorax_prefix_cache_hits_total")


def metric(url: str, series: str) -> float:
    text = requests.get(url + "/metrics", timeout=10).text
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(series + " "))


JSON_ADAPTER = "json-r8"
# (schema, sampled, adapter)
CONSTRAINED = [
    ("nested", False, None),
    ("array_of_objects", True, None),
    ("any_of_objects", True, None),
    ("string_pattern", False, None),
    ("optional_fields", True, JSON_ADAPTER),
    ("nested", False, JSON_ADAPTER),
]


def constrained(url: str) -> list[tuple[str, str]]:
    """Each CONSTRAINED schema, greedy or sampled with a seed, with or without the adapter, all at
    once: (text, finish reason)."""
    client = AsyncClient(url, timeout=120)

    async def one(name: str, sample: bool, adapter: str | None) -> tuple[str, str]:
        response = await client.generate(
            "<|im_start|>user\nAnswer in JSON.<|im_end|>\n<|im_start|>assistant\n",
            adapter_id=adapter,
            max_new_tokens=120,
            do_sample=sample,
            seed=3 if sample else None,
            response_format={"type": "json_object", "schema": SCHEMAS[name]},
        )
        return response.generated_text, response.details.finish_reason.value

    async def run() -> list[tuple[str, str]]:
        return list(await asyncio.gather(*(one(*case) for case in CONSTRAINED)))

    return asyncio.run(run())


def test_default_model_over_two_shards_ends_at_once_with_a_clear_message(
    default_model_path: Path, tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError) as e, launcher(default_model_path, tmp_path, "--num-shard", "2"):
        pass
    assert "does not divide evenly over 2 shards" in str(e.value)


def test_a_shard_killed_mid_stream_ends_requests_with_an_error(
    default_model_path: Path, tmp_path: Path
) -> None:
    body = {
        "inputs": "Tell me a long story.",
        "parameters": {"max_new_tokens": 500, "ignore_eos_token": True},
    }
    with launcher(default_model_path, tmp_path, "--num-shard", "3", "--max-restarts", "0") as s:
        with requests.post(s.url + "/generate_stream", json=body, stream=True, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            shards = subprocess.run(
                ["pgrep", "-P", str(s.proc.pid)], capture_output=True, text=True
            ).stdout.split()
            assert len(shards) == 3
            subprocess.run(["kill", "-9", shards[1]], check=True)
            events = [json.loads(line[5:]) for line in lines if line.startswith(b"data:")]
        assert events and "error" in events[-1]
        assert s.proc.wait(timeout=60) != 0
        assert "shard 1 exited" in s.log()
