"""The scheduler on its own: budgets, chunked prefill, preemption under block pressure, release."""

from __future__ import annotations

import dataclasses

from loraxpy.router.kv_blocks import BlockAllocator
from loraxpy.router.scheduler import FinishReason, Scheduler, SchedulerConfig, SequenceState, Status


def make(num_blocks: int = 64, block_size: int = 4, **cfg: object) -> Scheduler:
    config = SchedulerConfig(**{"max_step_tokens": 32, "waiting_served_ratio": 0.0, **cfg})  # type: ignore[arg-type]
    return Scheduler(config, BlockAllocator(num_blocks, block_size))


def run_to_completion(s: Scheduler, max_steps: int = 1000) -> list[tuple[int, ...]]:
    """Drives the scheduler with a fake model that samples token 7; returns each step's released ids."""
    released = []
    for _ in range(max_steps):
        if not s.has_work():
            return released
        out = s.schedule()
        released.append(out.finished_ids)
        sampled = {r.seq.id: 7 for r in out.scheduled if r.seq.num_computed_tokens == r.seq.num_tokens}
        s.postprocess(sampled)
    raise AssertionError("scheduler did not finish")


def test_long_prompt_is_prefilled_in_chunks_within_the_budget() -> None:
    s = make(max_step_tokens=10)
    seq = SequenceState(id=1, prompt_ids=list(range(25)), max_new_tokens=2)
    s.add(seq)
    sizes = []
    for _ in range(3):
        out = s.schedule()
        sizes.append([r.num_tokens for r in out.scheduled])
        s.postprocess({1: 7} if seq.num_computed_tokens == seq.num_tokens else {})
    assert sizes == [[10], [10], [5]]
    assert [r.is_new for r in s.schedule().scheduled] == [False]


def test_decodes_and_new_prompts_share_a_step() -> None:
    s = make(max_step_tokens=16)
    s.add(SequenceState(id=1, prompt_ids=[1, 2, 3], max_new_tokens=5))
    first = s.schedule()
    s.postprocess({1: 9})
    s.add(SequenceState(id=2, prompt_ids=list(range(8)), max_new_tokens=5))
    second = s.schedule()
    assert [(r.seq.id, r.num_tokens, r.is_new) for r in first.scheduled] == [(1, 3, True)]
    assert [(r.seq.id, r.num_tokens, r.is_new) for r in second.scheduled] == [(1, 1, False), (2, 8, True)]


def test_all_blocks_are_free_and_every_id_released_after_completion() -> None:
    s = make(num_blocks=16)
    for i in range(6):
        s.add(SequenceState(id=i, prompt_ids=list(range(3 + i)), max_new_tokens=4 + i))
    released = run_to_completion(s)
    assert s.allocator.num_free == 16
    assert sorted(i for step in released for i in step) == list(range(6))


def test_block_pressure_preempts_the_newest_request_and_still_finishes_everyone() -> None:
    # 6 blocks of 4 tokens: two requests of 8 prompt + 8 new tokens cannot both fit.
    s = make(num_blocks=6, block_size=4)
    a = SequenceState(id=1, prompt_ids=list(range(8)), max_new_tokens=8)
    b = SequenceState(id=2, prompt_ids=list(range(8)), max_new_tokens=8)
    s.add(a)
    s.add(b)
    run_to_completion(s)
    assert b.num_preemptions >= 1 and a.num_preemptions == 0
    assert a.finish_reason is b.finish_reason is FinishReason.LENGTH
    assert len(a.output_ids) == len(b.output_ids) == 8
    assert s.allocator.num_free == 6


def test_preempted_request_is_resent_in_full_with_its_generated_tokens() -> None:
    s = make(num_blocks=4, block_size=4)
    a = SequenceState(id=1, prompt_ids=list(range(7)), max_new_tokens=6)
    b = SequenceState(id=2, prompt_ids=list(range(7)), max_new_tokens=6)
    s.add(a)
    s.add(b)
    resent = []
    for _ in range(100):
        if not s.has_work():
            break
        out = s.schedule()
        resent += [
            (r.num_tokens, r.seq.num_tokens) for r in out.scheduled if r.is_new and r.seq.num_preemptions
        ]
        s.postprocess({r.seq.id: 7 for r in out.scheduled if r.seq.num_computed_tokens == r.seq.num_tokens})
    assert resent, "a preempted request comes back"
    num_scheduled, num_tokens = resent[0]
    assert num_scheduled == num_tokens > 7  # recomputes the prompt and the tokens generated so far


def test_eos_ends_a_request_and_finish_releases_it() -> None:
    s = make()
    seq = SequenceState(id=1, prompt_ids=[1, 2], max_new_tokens=10, eos_token_ids=frozenset({5}))
    s.add(seq)
    s.schedule()
    assert s.postprocess({1: 5}) == [seq]
    assert seq.finish_reason is FinishReason.EOS_TOKEN and seq.status is Status.FINISHED
    assert s.schedule().finished_ids == (1,)


def test_aborting_a_waiting_request_never_reaches_the_worker() -> None:
    s = make(max_num_seqs=1)
    s.add(SequenceState(id=1, prompt_ids=[1], max_new_tokens=3))
    waiting = SequenceState(id=2, prompt_ids=[1], max_new_tokens=3)
    s.add(waiting)
    s.schedule()
    s.postprocess({1: 9})
    s.finish(waiting, FinishReason.ABORTED)
    assert s.num_waiting == 0
    out = s.schedule()
    assert 2 not in out.finished_ids and [r.seq.id for r in out.scheduled] == [1]


def test_only_eligible_adapter_queues_are_admitted() -> None:
    s = make()
    s.add(SequenceState(id=1, prompt_ids=[1], max_new_tokens=1, adapter_index=3))
    s.add(SequenceState(id=2, prompt_ids=[1], max_new_tokens=1, adapter_index=0))
    out = s.schedule(eligible_adapters=[0])
    assert [r.seq.id for r in out.scheduled] == [2]


def test_late_prompts_join_running_decodes_at_the_next_step_by_default() -> None:
    """The router's default admission (waiting_served_ratio 0): 5 prompts that arrive while 11 requests
    decode are prefilled in the very next step. LoRAX's 1.2 holds them back --max-waiting-tokens steps
    (not until the running requests finish: steps that admit nothing count towards that limit)."""
    from loraxpy.router.config import RouterConfig

    router = RouterConfig()
    config = SchedulerConfig(
        max_step_tokens=512,
        waiting_served_ratio=router.waiting_served_ratio,
        max_waiting_steps=router.max_waiting_tokens,
    )
    for ratio, expected_wait in ((config.waiting_served_ratio, 0), (1.2, router.max_waiting_tokens)):
        s = Scheduler(dataclasses.replace(config, waiting_served_ratio=ratio), BlockAllocator(256, 16))
        for i in range(11):
            s.add(SequenceState(id=i, prompt_ids=[1] * 8, max_new_tokens=100))
        s.postprocess({r.seq.id: 7 for r in s.schedule().scheduled})
        for i in range(11, 16):
            s.add(SequenceState(id=i, prompt_ids=[1] * 8, max_new_tokens=100))
        waited = 0
        while not any(r.is_new for r in s.schedule().scheduled):
            waited += 1
            s.postprocess({seq.id: 7 for seq in s.running})
        assert waited == expected_wait, ratio
