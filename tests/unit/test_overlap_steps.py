"""Overlapped steps: which step the scheduler sends ahead (and when it does not), the workers' order
of steps sent ahead, and the engine over a worker that checks every step as a real one does: the
same tokens with overlap on and off, nothing shown past a request's end, every block and request
given back."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from loraxpy.router.engine import Engine, GenerateInput, TokenEvent
from loraxpy.router.kv_blocks import BlockAllocator
from loraxpy.router.scheduler import FinishReason, Scheduler, SchedulerConfig, SchedulerOutput, SequenceState
from loraxpy.router.worker_client import StepReply, StepResult, WorkerError
from loraxpy.worker.batch import WorkerInputError
from loraxpy.worker.step_order import StepOrder


def make(num_blocks: int = 64, block_size: int = 4, **cfg: object) -> Scheduler:
    config = SchedulerConfig(**{"max_step_tokens": 32, **cfg})  # type: ignore[arg-type]
    return Scheduler(config, BlockAllocator(num_blocks, block_size))


def decoding(s: Scheduler, *seqs: SequenceState) -> SchedulerOutput:
    """Admits `seqs`, applies their first tokens, and returns the first all-decode step (in flight)."""
    for seq in seqs:
        s.add(seq)
    s.schedule()
    s.postprocess({seq.id: 7 for seq in seqs})
    return s.schedule()


def test_the_step_ahead_decodes_the_token_in_flight_and_takes_a_block_at_the_boundary() -> None:
    s = make(block_size=4)
    a, b = SequenceState(1, [1, 2, 3], 10), SequenceState(2, [1, 2, 3, 4, 5, 6], 10)
    in_flight = decoding(s, a, b)  # a computes token 4 (position 3), b position 6
    ahead = s.schedule_ahead(in_flight)
    assert ahead is not None
    assert [(r.seq.id, r.num_tokens, r.is_new, len(r.new_blocks)) for r in ahead.scheduled] == [
        (1, 1, False, 1),  # position 4 starts a's second block
        (2, 1, False, 0),
    ]
    assert (a.num_computed_tokens, a.num_tokens) == (5, 4)  # the token in flight is computed next
    s.postprocess({1: 8, 2: 8})  # the step in flight's tokens arrive
    assert s.schedule_ahead(ahead) is not None  # and the chain goes on


def test_a_request_that_ends_by_length_in_flight_is_left_out_of_the_step_ahead() -> None:
    s = make()
    ends, goes_on = SequenceState(1, [1, 2], 2), SequenceState(2, [1, 2], 9)
    ahead = s.schedule_ahead(decoding(s, ends, goes_on))
    assert ahead is not None and [r.seq.id for r in ahead.scheduled] == [2]


@pytest.mark.parametrize("case", ["prompt chunk", "new", "waiting", "no blocks", "guessing", "not scheduled"])
def test_no_step_is_sent_ahead_where_its_shape_is_not_known(case: str) -> None:
    s = make(
        num_blocks=3 if case == "no blocks" else 64,
        max_step_tokens=8,
        num_speculative_tokens=2 * (case == "guessing"),
    )
    a = SequenceState(1, [1, 2, 3], 10)
    if case == "new":
        s.add(a)
        in_flight = s.schedule()
    elif case == "prompt chunk":
        s.add(a)
        s.add(SequenceState(2, list(range(20)), 4))
        s.schedule()  # a's prompt and the first 5 tokens of request 2's
        s.postprocess({1: 7})
        in_flight = s.schedule()  # a decodes, request 2 computes its next 7 prompt tokens
    else:
        in_flight = decoding(s, a, *([SequenceState(2, list(range(7)), 10)] if case == "no blocks" else []))
    if case == "waiting":
        s.add(SequenceState(3, [1], 4))
    if case == "not scheduled":
        s.running.append(SequenceState(4, [1], 4))
    assert s.schedule_ahead(in_flight) is None


def test_a_step_sent_ahead_waits_for_the_one_it_follows() -> None:
    order = StepOrder()
    entered: list[int] = []

    def send(step_id: int, after: int) -> None:
        with order.turn(step_id, after):
            entered.append(step_id)

    ahead = threading.Thread(target=send, args=(8, 7))
    ahead.start()
    time.sleep(0.05)
    assert entered == []  # step 7 has not arrived yet
    send(7, 0)
    ahead.join(5)
    assert entered == [7, 8]
    with pytest.raises(WorkerInputError, match="did not arrive"):
        StepOrder(timeout_s=0.01).turn(3, 2).__enter__()


EOS = 5


class OrderedWorker:
    """Runs steps one at a time in the router's order, refusing what a real worker refuses, and
    samples a token that depends on the request's whole state (so a wrong input shows)."""

    def __init__(self) -> None:
        self.tokens: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}
        self.last_step = 0
        self.turn = asyncio.Condition()

    async def step(
        self,
        out: SchedulerOutput,
        metadata: object = (),
        masks: object = None,
        step_id: int = 0,
        after_step_id: int = 0,
    ) -> StepReply:
        async with self.turn:
            await self.turn.wait_for(lambda: not after_step_id or self.last_step == after_step_id)
            try:
                return self._run(out)
            finally:
                self.last_step = step_id
                self.turn.notify_all()
                await asyncio.sleep(0.002)  # the forward pass: the router works meanwhile

    def _run(self, out: SchedulerOutput) -> StepReply:
        for rid in out.finished_ids:
            if rid not in self.tokens:
                raise WorkerError(f"unknown {rid}", None)
            del self.tokens[rid], self.computed[rid]
        results = []
        for r in out.scheduled:
            if r.is_new:
                self.tokens[r.seq.id], self.computed[r.seq.id] = (
                    list(r.seq.all_token_ids),
                    r.num_computed_tokens,
                )
            tokens = self.tokens[r.seq.id]
            self.computed[r.seq.id] += r.num_tokens
            if self.computed[r.seq.id] > len(tokens):
                raise WorkerError(f"request {r.seq.id} computes tokens it does not have", None)
            token = None
            if self.computed[r.seq.id] == len(tokens):
                token = (sum(tokens) * 7 + len(tokens) * 3) % 61 + 1
                tokens.append(token)
            results.append(
                StepResult(r.seq.id, self.computed[r.seq.id], (token, -0.1) if token else None, (), 0, ())
            )
        return StepReply(results, 0.002)


class Text:
    def push(self, token_id: int) -> tuple[str, bool]:
        return f"<{token_id}>", token_id == 13  # token 13 ends the text like a stop sequence

    def flush(self) -> str:
        return ""


async def serve(
    overlap: bool, requests: list[tuple[list[int], int, int]]
) -> tuple[list[tuple[list[int], str]], int]:
    worker = OrderedWorker()
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=32, max_step_tokens=256), BlockAllocator(120, 4))
    engine = Engine(worker, scheduler, frozenset({EOS}), overlap_steps=overlap)  # type: ignore[arg-type]
    engine.start()

    async def one(prompt: list[int], n: int, leave_after: int) -> tuple[list[int], str]:
        tokens, reason = [], ""
        stream = engine.generate(GenerateInput(tuple(prompt), n), Text())
        async for event in stream:
            if not isinstance(event, TokenEvent):
                continue
            tokens.append(event.token_id)
            reason = event.finish_reason.value if event.finish_reason else ""
            if len(tokens) == leave_after and not reason:  # the client goes away mid-stream
                close = getattr(stream, "aclose", None)
                await (close() if close else stream.__aexit__(None, None, None))  # type: ignore[attr-defined]
                return tokens, FinishReason.ABORTED.value
        return tokens, reason

    outcomes = await asyncio.gather(*(one(*r) for r in requests))
    async with engine.between_steps():  # releases what finished last on the worker
        pass
    await engine.stop()
    assert scheduler.allocator.num_free == 120 and not scheduler.running
    assert worker.tokens == {}  # every request released on the worker
    return list(outcomes), engine.num_overlapped_steps


def test_overlapped_steps_give_the_same_tokens_and_show_nothing_past_an_end() -> None:
    rng = random.Random(3)
    requests = [
        (rng.choices(range(1, 30), k=rng.randint(1, 9)), rng.randint(1, 30), rng.choice([0, 0, 0, 4]))
        for _ in range(24)
    ]
    off, num_ahead_off = asyncio.run(serve(False, requests))
    on, num_ahead_on = asyncio.run(serve(True, requests))
    assert on == off
    assert num_ahead_off == 0 and num_ahead_on > 10
    reasons = {reason for _, reason in on}
    assert {"length", "eos_token", "stop_sequence", "aborted"} <= reasons, reasons
    for (tokens, _), (_, n, _) in zip(on, requests, strict=True):
        assert len(tokens) <= n
        assert EOS not in tokens[:-1] and 13 not in tokens[:-1]  # nothing after an end was shown
