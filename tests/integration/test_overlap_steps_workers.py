"""Overlapped steps (--overlap-steps) with the router's engine driving two real worker shards of the
tiny Llama over loopback: concurrent greedy requests of the base model and two adapters, whose
max_new_tokens, EOS and stop sequences end them at different steps while the next step is already
on the workers, give the same tokens, texts and finish reasons with overlap on and off, and those
tokens are HF transformers' and PEFT's greedy ones."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import served_tiny_llama_with_adapters
from worker_driver import sharded_workers

from loraxpy.router.engine import Engine, GenerateInput, TokenEvent
from loraxpy.router.kv_blocks import BlockAllocator
from loraxpy.router.scheduler import Scheduler, SchedulerConfig
from loraxpy.router.text import Tokenizer
from loraxpy.router.worker_client import WorkerClient

pytestmark = pytest.mark.slow

NUM_BLOCKS = 64
ADAPTERS = ("a", "b")  # adapter index i + 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama (word-level tokenizer: "w7" is token 7) and two random LoRA adapters."""
    targets = ("q_proj", "v_proj", "down_proj")
    return served_tiny_llama_with_adapters(tmp_path_factory, "overlap", dict.fromkeys(ADAPTERS, targets), 90)


@pytest.fixture(scope="module")
def addresses(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    sock_dir = tmp_path_factory.mktemp("overlap-workers")
    args = ("--adapter-root", str(tiny.parent / "adapters"))
    with sharded_workers(tiny, sock_dir, 2, extra_args=args):
        yield [f"unix://{sock_dir}/shard-{rank}.sock" for rank in range(2)]


def greedy(tiny: Path, plan: list[tuple[list[int], int, int]]) -> list[list[int]]:
    """HF transformers' greedy tokens for each (prompt, tokens, adapter index), through PEFT for an adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models: dict[int, Any] = {}
    outs = []
    for prompt, n, adapter in plan:
        if adapter not in models:
            model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
            if adapter:
                model = PeftModel.from_pretrained(model, tiny.parent / "adapters" / ADAPTERS[adapter - 1])
            models[adapter] = model
        with torch.no_grad():
            out = models[adapter].generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0]
        outs.append(out[len(prompt) :].tolist())
    return outs


Request = tuple[list[int], int, int, tuple[str, ...]]  # prompt, max_new_tokens, adapter index, stops
Outcome = tuple[list[int], str, str]  # tokens, text, finish reason


async def serve(
    addresses: list[str], tokenizer: Tokenizer, requests: list[Request], eos: int | None, overlap: bool
) -> tuple[list[Outcome], int]:
    """Every request at once through a fresh engine; their outcomes and the steps sent ahead."""
    client = WorkerClient(addresses)
    await client.wait_ready(60)
    num_blocks = await client.warmup(256, 16, NUM_BLOCKS)
    for index, name in enumerate(ADAPTERS, start=1):
        await client.load_adapter(index, name, "local")
    allocator = BlockAllocator(num_blocks, 16, enable_caching=True)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=16, max_step_tokens=256), allocator)
    engine = Engine(
        client, scheduler, frozenset() if eos is None else frozenset({eos}), overlap_steps=overlap
    )
    engine.start()

    async def one(prompt: list[int], n: int, adapter: int, stops: tuple[str, ...]) -> Outcome:
        tokens, text, reason = [], "", ""
        inp = GenerateInput(tuple(prompt), n, adapter_index=adapter, prefix_identity=f"adapter-{adapter}")
        async for event in engine.generate(inp, tokenizer.stream(prompt, stops)):
            if isinstance(event, TokenEvent):
                tokens.append(event.token_id)
                text += event.text
                if event.finish_reason is not None:
                    reason = event.finish_reason.value
        return tokens, text, reason

    try:
        outcomes = await asyncio.gather(*(one(*r) for r in requests))
        # Nothing is left holding blocks: finished requests' extra tokens were accounted for.
        assert not scheduler.running and allocator.num_free == allocator.num_blocks
        return list(outcomes), engine.num_overlapped_steps
    finally:
        await engine.stop()
        await client.close()


def test_overlapped_steps_give_the_tokens_of_synchronous_steps_and_of_transformers(
    tiny: Path, addresses: list[str]
) -> None:
    tokenizer = Tokenizer(tiny)
    rng = random.Random(5)
    prompts = [rng.choices(range(3, 320), k=rng.randint(4, 20)) for _ in range(9)]
    lengths = [24, 3, 17, 9, 24, 1, 12, 20, 6]  # max_new_tokens: ends land on different steps
    adapters = [i % 3 for i in range(9)]
    full = greedy(tiny, list(zip(prompts, lengths, adapters, strict=True)))
    # EOS: a token request 0 samples mid-way; a stop sequence: two words request 4 writes mid-way.
    eos = full[0][10]
    stop = tokenizer.decode(full[4][6:8])
    stops = [(stop,) if i in (4, 7) else () for i in range(9)]
    requests = list(zip(prompts, lengths, adapters, stops, strict=True))

    off, num_ahead_off = asyncio.run(serve(addresses, tokenizer, requests, eos, overlap=False))
    on, num_ahead_on = asyncio.run(serve(addresses, tokenizer, requests, eos, overlap=True))

    assert num_ahead_off == 0 and num_ahead_on > 10, num_ahead_on
    assert on == off
    for (tokens, text, reason), want, n in zip(on, full, lengths, strict=True):
        assert tokens == want[: len(tokens)]  # transformers' (and PEFT's) greedy tokens, cut where it ended
        if reason == "length":
            assert len(tokens) == n
        elif reason == "eos_token":
            assert tokens[-1] == eos and eos not in tokens[:-1]
        else:
            assert reason == "stop_sequence" and stop not in text
    reasons = {reason for _, _, reason in on}
    assert reasons == {"length", "eos_token", "stop_sequence"}, [o[2] for o in on]
    assert on[4][2] == "stop_sequence" and len(on[4][0]) < lengths[4]
