"""The engine with structured output: masks go with the steps that sample, a finished grammar ends
its request, and a preempted request's matcher carries on where it was (real llguidance grammars,
a stand-in worker that samples the lowest allowed token)."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from pathlib import Path

import jsonschema
import llguidance
import numpy as np
import pytest

from loraxpy.router.engine import Engine, GenerateInput, TokenEvent
from loraxpy.router.grammar import GrammarCompiler, GrammarMatcher, GrammarSpec
from loraxpy.router.kv_blocks import BlockAllocator
from loraxpy.router.scheduler import FinishReason, Scheduler, SchedulerConfig, SchedulerOutput
from loraxpy.router.text import Tokenizer
from loraxpy.router.worker_client import StepReply, StepResult

EOS = 2
PLAIN_TOKEN = 5
SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}, "s": {"enum": ["ab", "cd"]}},
    "required": ["n", "s"],
    "additionalProperties": False,
}


class LowestAllowedWorker:
    """Samples the lowest token id a request's mask allows (PLAIN_TOKEN without a mask); records
    each mask it receives with whether that request sampled in the step."""

    def __init__(self) -> None:
        self.masks_seen: list[bool] = []

    async def step(
        self, out: SchedulerOutput, metadata: tuple[tuple[str, str], ...] = (), masks: object = None
    ) -> StepReply:
        assert isinstance(masks, dict)
        results = []
        for r in out.scheduled:
            samples = r.seq.num_computed_tokens >= r.seq.num_tokens
            mask = masks.get(r.seq.id)
            if mask is not None:
                self.masks_seen.append(samples)
            token = None
            if samples:
                token_id = PLAIN_TOKEN
                if mask is not None:
                    token_id = next(t for t in range(len(mask) * 8) if mask[t // 8] >> (t % 8) & 1)
                token = (token_id, -0.1)
            results.append(StepResult(r.seq.id, r.seq.num_computed_tokens, token, (), 0, ()))
        await asyncio.sleep(0)
        return StepReply(results, 0.001)


@pytest.fixture(scope="module")
def tokenizer(default_model_path: Path) -> Tokenizer:
    return Tokenizer(default_model_path)


@pytest.fixture(scope="module")
def compiler(default_model_path: Path, tokenizer: Tokenizer) -> GrammarCompiler:
    return GrammarCompiler.for_model(default_model_path, tokenizer.vocab_size, (EOS,))


def run(
    tokenizer: Tokenizer,
    grammars: GrammarCompiler,
    scheduler: Scheduler,
    inputs: list[GenerateInput],
    worker: LowestAllowedWorker | None = None,
    *,
    host_bound: bool = False,
    hold_s: float = 0.0,
) -> tuple[list[tuple[list[int], FinishReason | None]], LowestAllowedWorker]:
    """Each input's tokens and finish reason from an engine over `worker`; each consumer holds the
    loop for `hold_s` per token (a handler writing it out)."""
    worker = worker or LowestAllowedWorker()

    async def scenario() -> list[tuple[list[int], FinishReason | None]]:
        engine = Engine(worker, scheduler, frozenset({EOS}), host_bound=host_bound, grammars=grammars)  # type: ignore[arg-type]
        engine.start()

        async def one(inp: GenerateInput) -> tuple[list[int], FinishReason | None]:
            tokens, finish = [], None
            async for event in engine.generate(inp, tokenizer.stream(list(inp.input_ids))):
                if isinstance(event, TokenEvent):
                    if hold_s:
                        time.sleep(hold_s)
                    tokens.append(event.token_id)
                    finish = event.finish_reason
            return tokens, finish

        try:
            return list(await asyncio.gather(*(one(i) for i in inputs)))
        finally:
            await engine.stop()

    return asyncio.run(scenario()), worker


def test_masks_travel_only_with_sampling_steps_and_a_finished_grammar_ends_the_request(
    tokenizer: Tokenizer, compiler: GrammarCompiler
) -> None:
    grammar = compiler.compile(GrammarSpec("json_schema", SCHEMA))
    prompt = tuple(range(100, 130))  # longer than a step's 8 tokens: prefilled in chunks
    scheduler = Scheduler(SchedulerConfig(max_step_tokens=8), BlockAllocator(64, 16))
    inputs = [GenerateInput(prompt, 40, grammar=grammar), GenerateInput(prompt[:5], 6)]
    (constrained, plain), worker = run(tokenizer, compiler, scheduler, inputs)
    assert worker.masks_seen and all(worker.masks_seen)  # never on a prompt chunk that samples nothing
    assert len(worker.masks_seen) == len(constrained[0])  # one per sampled token, none for the neighbour
    text = tokenizer.decode(constrained[0])
    assert json.loads(text)["s"] in ("ab", "cd")
    assert constrained[1] is FinishReason.EOS_TOKEN and EOS not in constrained[0]
    assert plain == ([PLAIN_TOKEN] * 6, FinishReason.LENGTH)


def test_a_preempted_request_resumes_its_grammar_where_it_was(
    tokenizer: Tokenizer, compiler: GrammarCompiler
) -> None:
    grammar = compiler.compile(GrammarSpec("json_schema", SCHEMA))
    # 6 blocks of 4 tokens for three requests that each grow to about 20: the newest is preempted.
    scheduler = Scheduler(SchedulerConfig(max_step_tokens=64), BlockAllocator(6, 4))
    inputs = [GenerateInput((100 + i, 101, 102), 40, grammar=grammar) for i in range(3)]
    results, _ = run(tokenizer, compiler, scheduler, inputs)
    assert scheduler.num_preemptions > 0
    texts = [tokenizer.decode(tokens) for tokens, _ in results]
    assert all(finish is FinishReason.EOS_TOKEN for _, finish in results)
    assert texts == [texts[0]] * 3 and json.loads(texts[0])["n"] in range(10)


def test_constrained_requests_do_not_speculate_beside_ones_that_do(
    tokenizer: Tokenizer, compiler: GrammarCompiler
) -> None:
    grammar = compiler.compile(GrammarSpec("json_schema", SCHEMA))

    class RecordingWorker(LowestAllowedWorker):
        def __init__(self) -> None:
            super().__init__()
            self.drafts: dict[int, int] = {}  # request id -> guessed tokens sent

        async def step(
            self, out: SchedulerOutput, metadata: tuple[tuple[str, str], ...] = (), masks: object = None
        ) -> StepReply:
            for r in out.scheduled:
                self.drafts[r.seq.id] = self.drafts.get(r.seq.id, 0) + len(r.draft_token_ids)
            return await super().step(out, metadata, masks)

    scheduler = Scheduler(
        SchedulerConfig(max_step_tokens=64, num_speculative_tokens=4), BlockAllocator(64, 16)
    )
    inputs = [GenerateInput((100, 101, 102), 40, grammar=grammar), GenerateInput((PLAIN_TOKEN,) * 4, 12)]
    recording = RecordingWorker()
    (constrained, plain), worker = run(tokenizer, compiler, scheduler, inputs, recording)
    drafts = recording.drafts
    assert json.loads(tokenizer.decode(constrained[0]))["s"] in ("ab", "cd")
    assert len(worker.masks_seen) == len(constrained[0]) and all(worker.masks_seen)
    # The plain request repeats its prompt's token: it was sent guesses; the constrained one never.
    constrained_id, plain_id = sorted(drafts)
    assert drafts[constrained_id] == 0 and drafts[plain_id] > 0
    assert plain == ([PLAIN_TOKEN] * 12, FinishReason.LENGTH)


def test_next_masks_are_computed_on_the_mask_thread_and_equal_a_fresh_matchers(
    tokenizer: Tokenizer, compiler: GrammarCompiler, default_model_path: Path
) -> None:
    """Masks computed ahead (on the mask thread, while the loop hands out tokens: here consumers
    that take 20 ms per token, on a host-bound engine that gives them their turns) or, where the
    thread had not started, on the loop, are the masks of the state the request is in when its
    step is sent: each equals the mask of an independent llguidance matcher fed the same tokens."""
    grammar = compiler.compile(GrammarSpec("json_schema", SCHEMA))
    oracle_tokenizer = llguidance.LLTokenizer(
        (default_model_path / "tokenizer.json").read_text(), n_vocab=tokenizer.vocab_size, eos_token=[EOS]
    )
    text = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})  # type: ignore[arg-type]
    threads: list[str] = []
    masks = compiler.masks

    def recording_masks(matchers: list[GrammarMatcher]) -> list[bytes]:
        threads.append(threading.current_thread().name)
        return masks(matchers)

    class OracleWorker(LowestAllowedWorker):
        """Samples a random allowed token; checks every mask against its own matcher per request."""

        def __init__(self) -> None:
            super().__init__()
            self.oracles: dict[int, llguidance.LLMatcher] = {}
            self.rng = random.Random(3)
            self.num_checked = 0

        async def step(
            self, out: SchedulerOutput, metadata: tuple[tuple[str, str], ...] = (), masks: object = None
        ) -> StepReply:
            assert isinstance(masks, dict)
            results = []
            for r in out.scheduled:
                token = None
                if r.seq.id in masks:
                    oracle = self.oracles.setdefault(r.seq.id, llguidance.LLMatcher(oracle_tokenizer, text))
                    mask = masks[r.seq.id]
                    assert mask == bytes(oracle.compute_bitmask()[: len(mask)])
                    self.num_checked += 1
                    allowed = np.unpackbits(np.frombuffer(mask, np.uint8), bitorder="little").nonzero()[0]
                    token_id = int(self.rng.choice(allowed))
                    if token_id != EOS:
                        assert oracle.consume_token(token_id)
                    token = (token_id, -0.1)
                results.append(StepResult(r.seq.id, r.seq.num_computed_tokens, token, (), 0, ()))
            await asyncio.sleep(0)
            return StepReply(results, 0.001)

    scheduler = Scheduler(SchedulerConfig(max_step_tokens=64), BlockAllocator(64, 16))
    inputs = [GenerateInput((100 + i, 101, 102), 40, grammar=grammar) for i in range(4)]
    worker = OracleWorker()
    compiler.masks = recording_masks  # type: ignore[method-assign]
    try:
        # A host-bound engine gives the consumers their turns; each holds the loop 20 ms per token.
        results, _ = run(tokenizer, compiler, scheduler, inputs, worker, host_bound=True, hold_s=0.02)
    finally:
        del compiler.masks
    assert worker.num_checked == sum(len(tokens) for tokens, _ in results) > 4
    for tokens, finish in results:
        jsonschema.validate(json.loads(tokenizer.decode([t for t in tokens if t != EOS])), SCHEMA)
        assert finish in (FinishReason.EOS_TOKEN, FinishReason.LENGTH)
    # The first masks come from compile time; later ones were computed on the mask thread while
    # the consumers held the loop (on the loop only where the thread had not started by the step).
    assert "grammar-masks_0" in threads, threads
