"""Embedding requests in the scheduler: computed whole in one step (never chunked), so one that does
not fit the step's remaining budget waits for the next step instead of being split, and requests
behind it wait too (first come, first served)."""

from __future__ import annotations

from loraxpy.router.kv_blocks import BlockAllocator
from loraxpy.router.scheduler import FinishReason, Scheduler, SchedulerConfig, SequenceState


def embedding(rid: int, num_tokens: int) -> SequenceState:
    seq = SequenceState(id=rid, prompt_ids=list(range(1, num_tokens + 1)), max_new_tokens=0)
    seq.is_embedding = True
    return seq


def test_an_embedding_is_never_chunked_and_waits_for_a_step_with_room() -> None:
    s = Scheduler(SchedulerConfig(max_step_tokens=10), BlockAllocator(64, 4))
    s.add(SequenceState(id=1, prompt_ids=list(range(1, 7)), max_new_tokens=4))
    s.add(embedding(2, 8))
    s.add(SequenceState(id=3, prompt_ids=[1, 2], max_new_tokens=1))
    first = s.schedule()
    assert [(r.seq.id, r.num_tokens) for r in first.scheduled] == [
        (1, 6)
    ]  # 8 do not fit in 4; 3 waits behind
    s.postprocess({1: 5})
    second = s.schedule()
    assert [(r.seq.id, r.num_tokens) for r in second.scheduled] == [(1, 1), (2, 8), (3, 1)]  # whole, in order
    emb = second.scheduled[1].seq
    s.postprocess({1: 6})
    s.finish(emb, FinishReason.LENGTH)  # the engine ends it after its one step
    assert s.schedule().finished_ids == (2,) and not emb.blocks
