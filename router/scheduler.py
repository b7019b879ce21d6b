"""Continuous batching: which requests compute how many tokens in the next step, and their KV blocks.

Plain synchronous Python with two entry points, `schedule()` and `postprocess()`, testable without a
model. Each step the scheduler
1. keeps running requests going (one token for a decode, the next chunk for a long prompt),
   preempting the most recently arrived running request when KV blocks run out (its blocks are
   freed and it is recomputed later: memory pressure slows requests instead of failing them);
2. admits waiting requests in arrival order while the step's token budget, the sequence limit and
   free blocks allow; a prompt longer than the remaining budget is prefilled in chunks.
Waiting requests are queued per adapter (index 0 is the base model) so the adapter exchange can
choose which queues are eligible; until then every queue is.
With prefix caching (router/kv_blocks.py), an admitted request takes the cached blocks of its
longest cached prefix of full blocks (never all its tokens: the last one is computed so it has
logits) and computes from there; after each step the full blocks it has computed are keyed for
later requests. A request that asks for its prompt's log-probabilities computes every token.
With speculative decoding (`num_speculative_tokens`, router/speculative.py), a decoding request
that may speculate also computes up to that many guessed tokens after its last one, within the
step's token budget and the free blocks; `postprocess` takes back the ones the workers rejected
(their K/V are not counted as computed, so they are overwritten and never keyed in the cache).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from loraxpy.proto.sampling import SamplingParams
from loraxpy.router.kv_blocks import BlockAllocator, chain_hashes
from loraxpy.router.speculative import PromptLookup


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    ABORTED = "aborted"


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # requests in one step
    max_step_tokens: int = 4096  # tokens computed in one step (--max-batch-prefill-tokens)
    # LoRAX's admission knobs: admit new prompts once waiting >= ratio * running, or after
    # max_waiting_steps steps without admission.
    waiting_served_ratio: float = 0.0
    max_waiting_steps: int = 20
    num_speculative_tokens: int = 0  # --speculative-tokens: prompt-lookup guesses per decode (0: off)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_step_tokens < 1:
            raise ValueError("max_num_seqs and max_step_tokens must be positive")
        if self.num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be non-negative")
        if self.waiting_served_ratio < 0 or self.max_waiting_steps < 0:
            raise ValueError("waiting_served_ratio and max_waiting_steps must be non-negative")


@dataclass
class SequenceState:
    """The router's view of one request."""

    id: int
    prompt_ids: list[int]
    max_new_tokens: int
    adapter_index: int = 0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: frozenset[int] = frozenset()
    arrival: int = 0  # admission order, set by the scheduler
    output_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Worker-side state exists (sent as NewRequest and not yet released).
    is_on_worker: bool = False
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    is_embedding: bool = False  # prefilled whole in one step and pooled; nothing generated
    # Prefix caching: the adapter's identity (router/adapters.py); None: never cached nor reused.
    prefix_identity: str | None = None
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks, as far as hashed
    num_cached_blocks: int = 0  # of `blocks`, how many from the first are keyed in the cache
    # Speculative decoding: whether it may (not under a grammar, nor with top log-probs), the
    # guesses in the step in flight (counted in num_computed_tokens until verified), its n-grams.
    speculate: bool = True
    draft_token_ids: tuple[int, ...] = ()
    lookup: PromptLookup | None = None
    # Medusa: the guesses of its adapter's heads after its last token (the workers' last step's),
    # used instead of prompt lookup for its next guess.
    proposed_token_ids: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


@dataclass(frozen=True)
class ScheduledRequest:
    seq: SequenceState
    num_tokens: int  # tokens to compute this step
    new_blocks: tuple[int, ...]
    is_new: bool  # send in full (first time, or after preemption)
    num_computed_tokens: int = 0  # tokens already in the cache before this step (a cached prefix)

    @property
    def draft_token_ids(self) -> tuple[int, ...]:
        """Guessed tokens after the last one, counted in num_tokens (speculative decoding). The
        request's own, valid from `schedule` until the step's result is applied (not a field: a
        step with many requests builds one of these each, and the off path should cost nothing)."""
        return self.seq.draft_token_ids


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...]
    finished_ids: tuple[int, ...]  # release on the worker before this step
    num_proposed_tokens: int = 0  # Medusa guesses the workers may propose per sampled token

    @property
    def is_empty(self) -> bool:
        return not self.scheduled and not self.finished_ids


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator) -> None:
        self.config = config
        self.allocator = allocator
        self.waiting: dict[int, deque[SequenceState]] = {}  # adapter index -> queue
        self.running: list[SequenceState] = []
        self._to_release: list[int] = []
        self._arrivals = 0
        self._steps_since_admission = 0
        self.num_preemptions = 0
        # Speculative decoding, per adapter index: guessed tokens sent, and accepted by the workers.
        self.num_draft_tokens: dict[int, int] = {}
        self.num_accepted_tokens: dict[int, int] = {}

    # ---- requests in and out --------------------------------------------------------------------

    def add(self, seq: SequenceState) -> None:
        self._arrivals += 1
        seq.arrival = self._arrivals
        seq.status = Status.WAITING
        self.waiting.setdefault(seq.adapter_index, deque()).append(seq)

    def finish(self, seq: SequenceState, reason: FinishReason) -> None:
        """Ends a request (stop sequence, client gone, error): frees its blocks now, releases it next step."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.WAITING:
            self._unqueue(seq)
        else:
            self.running.remove(seq)
        self._free(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def _unqueue(self, seq: SequenceState) -> None:
        """Takes a waiting request out of its adapter's queue; an empty queue goes (adapter indices
        are reused, and the per-adapter metrics list each queue)."""
        queue = self.waiting[seq.adapter_index]
        queue.remove(seq)
        if not queue:
            del self.waiting[seq.adapter_index]

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def has_work(self) -> bool:
        return bool(self.running or self.num_waiting or self._to_release)

    def restart(self, allocator: BlockAllocator) -> None:
        """The workers restarted and hold nothing: waiting requests (they hold no blocks) stay
        queued for the new cache; there is nothing left to release. Running ones must be finished."""
        assert not self.running, "finish running requests before the workers' state is gone"
        self.allocator = allocator
        self._to_release = []

    def take_released(self) -> tuple[int, ...]:
        """Ids to release on the worker now (outside a step), e.g. before offloading their adapter."""
        released, self._to_release = tuple(self._to_release), []
        return released

    # ---- one step -------------------------------------------------------------------------------

    def schedule(self, eligible_adapters: Iterable[int] | None = None) -> SchedulerOutput:
        budget = self.config.max_step_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[int] = []
        speculate = self.config.num_speculative_tokens > 0
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted while making room for an earlier request
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n <= 0:
                continue
            draft = self._draft(seq, budget) if speculate and n == 1 else ()
            if draft:
                seq.draft_token_ids = draft
                n += len(draft)
            new_blocks = self._allocate_or_preempt(seq, n, preempted)
            if new_blocks is None:
                continue
            is_new = not seq.is_on_worker
            scheduled.append(ScheduledRequest(seq, n, tuple(new_blocks), is_new, seq.num_computed_tokens))
            budget -= n
        scheduled = [s for s in scheduled if s.seq.status is Status.RUNNING]
        budget = self.config.max_step_tokens - sum(s.num_tokens for s in scheduled)
        if self._should_admit() and not preempted:
            scheduled.extend(self._admit(budget, len(scheduled), eligible_adapters))
        else:
            self._steps_since_admission += 1  # max_waiting_steps counts these too
        for s in scheduled:
            s.seq.is_on_worker = True
            s.seq.num_computed_tokens += s.num_tokens
        released = tuple(self._to_release)
        self._to_release = []
        return SchedulerOutput(tuple(scheduled), released, self.config.num_speculative_tokens)

    def schedule_ahead(self, in_flight: SchedulerOutput) -> SchedulerOutput | None:
        """The step after `in_flight` (sent, its tokens not yet applied), when its shape is already
        known: every running request decodes the token `in_flight` samples for it, which the workers
        hold. None (schedule synchronously after the tokens arrive) when that is not the step
        `schedule()` would make: a request mid-prompt, guessing or new in `in_flight`, one that
        may guess next, requests waiting for a free seat, or blocks that would need a preemption.
        A request that `in_flight` ends (EOS, a stop sequence) computes one token too many, which the
        caller discards; one that `in_flight` ends by length is left out."""
        if self.num_waiting and len(self.running) < self.config.max_num_seqs:
            return None
        in_step = {r.seq.id for r in in_flight.scheduled}
        continuing: list[SequenceState] = []
        needed = 0
        for r in in_flight.scheduled:
            seq = r.seq
            if r.is_new or seq.draft_token_ids or seq.num_computed_tokens < seq.num_tokens:
                return None  # its next step is a prompt chunk, or waits for verified guesses
            if seq.status is not Status.RUNNING or len(seq.output_ids) + 1 >= seq.max_new_tokens:
                continue  # finished meanwhile (aborted), or ends with the token in flight
            if self.config.num_speculative_tokens and seq.speculate and not seq.sampling.top_logprobs:
                return None  # its guesses need the token in flight
            continuing.append(seq)
            needed += self.allocator.blocks_needed(seq.num_computed_tokens + 1, len(seq.blocks))
        if not continuing or any(seq.id not in in_step for seq in self.running):
            return None
        if not self.allocator.can_allocate(needed):
            return None
        scheduled = []
        for seq in continuing:
            blocks = self.allocator.allocate(
                self.allocator.blocks_needed(seq.num_computed_tokens + 1, len(seq.blocks))
            )
            seq.blocks.extend(blocks)
            scheduled.append(ScheduledRequest(seq, 1, tuple(blocks), False, seq.num_computed_tokens))
            seq.num_computed_tokens += 1
        self._steps_since_admission += 1
        released = tuple(self._to_release)
        self._to_release = []
        return SchedulerOutput(tuple(scheduled), released)

    def _draft(self, seq: SequenceState, budget: int) -> tuple[int, ...]:
        """Guesses for a decoding request, as many as the budget, its remaining tokens and the free
        blocks allow (never preempting anyone for a guess)."""
        if not seq.speculate or not seq.is_on_worker or seq.sampling.top_logprobs or seq.is_embedding:
            return ()
        k = min(self.config.num_speculative_tokens, budget - 1, seq.max_new_tokens - len(seq.output_ids) - 1)
        if k < 1:
            return ()
        if seq.proposed_token_ids:  # its adapter's Medusa heads guessed
            draft = list(seq.proposed_token_ids[:k])
        else:
            if seq.lookup is None:
                seq.lookup = PromptLookup()
            draft = seq.lookup.propose(seq.all_token_ids, k)
        while draft and not self.allocator.can_allocate(
            self.allocator.blocks_needed(seq.num_computed_tokens + 1 + len(draft), len(seq.blocks))
        ):
            draft = draft[:-1]
        return tuple(draft)

    def _allocate_or_preempt(self, seq: SequenceState, n: int, preempted: list[int]) -> list[int] | None:
        needed = self.allocator.blocks_needed(seq.num_computed_tokens + n, len(seq.blocks))
        while not self.allocator.can_allocate(needed):
            victim = max(self.running, key=lambda s: s.arrival)
            self._preempt(victim)
            preempted.append(victim.id)
            if victim is seq:
                return None
        blocks = self.allocator.allocate(needed)
        seq.blocks.extend(blocks)
        return blocks

    def _preempt(self, seq: SequenceState) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.num_computed_tokens = 0
        seq.draft_token_ids = ()  # guessed in this step before a later request preempted it
        seq.proposed_token_ids = ()
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.setdefault(seq.adapter_index, deque()).appendleft(seq)

    def _free(self, seq: SequenceState) -> None:
        self.allocator.free(seq.blocks)
        seq.blocks = []
        seq.num_cached_blocks = 0
        if seq.is_on_worker:
            self._to_release.append(seq.id)
            seq.is_on_worker = False

    def _should_admit(self) -> bool:
        if not self.running:
            return True
        if self.num_waiting >= self.config.waiting_served_ratio * len(self.running):
            return True
        return self._steps_since_admission >= self.config.max_waiting_steps

    def _admit(self, budget: int, num_seqs: int, eligible: Iterable[int] | None) -> list[ScheduledRequest]:
        admitted: list[ScheduledRequest] = []
        queues = [
            self.waiting[a] for a in (self.waiting if eligible is None else eligible) if a in self.waiting
        ]
        while budget > 0 and num_seqs + len(admitted) < self.config.max_num_seqs:
            heads = [q for q in queues if q]
            if not heads:
                break
            queue = min(heads, key=lambda q: q[0].arrival)
            seq = queue[0]
            cached, num_looked_up = self._cached_prefix(seq)
            num_cached_tokens = len(cached) * self.allocator.block_size
            n = seq.num_tokens - num_cached_tokens
            if n > budget:
                if seq.is_embedding:  # pooled in one step
                    break
                n = budget
            needed = self.allocator.blocks_needed(num_cached_tokens + n, len(cached))
            if not self.allocator.can_allocate(needed, reusing=cached):
                break
            self._unqueue(seq)
            self.allocator.take_cached(cached, num_looked_up)
            seq.blocks = cached + self.allocator.allocate(needed)
            seq.num_cached_blocks = len(cached)
            seq.num_computed_tokens = num_cached_tokens
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(ScheduledRequest(seq, n, tuple(seq.blocks), True, num_cached_tokens))
            budget -= n
        self._steps_since_admission = 0 if admitted else self._steps_since_admission + 1
        return admitted

    def _cached_prefix(self, seq: SequenceState) -> tuple[list[int], int]:
        """The cached blocks `seq` may start from, and how many full blocks were looked up."""
        if seq.prefix_identity is None or not self.allocator.enable_caching or seq.sampling.prompt_logprobs:
            return [], 0
        block_size = self.allocator.block_size
        num_full = (seq.num_tokens - 1) // block_size  # its last token is always computed
        return self.allocator.lookup(self._block_hashes(seq, num_full)), num_full

    def _block_hashes(self, seq: SequenceState, num_full: int) -> list[bytes]:
        """The hashes of `seq`'s first `num_full` blocks (hashed once, extended as it grows)."""
        assert seq.prefix_identity is not None
        if len(seq.block_hashes) < num_full:
            block_size = self.allocator.block_size
            tokens = seq.all_token_ids[: num_full * block_size]
            seq.block_hashes = chain_hashes(seq.prefix_identity, tokens, block_size, seq.block_hashes)
        return seq.block_hashes[:num_full]

    def _cache_computed(self) -> None:
        """After a step: keys the full blocks whose K/V the running requests now hold."""
        if not self.allocator.enable_caching:
            return
        block_size = self.allocator.block_size
        for seq in self.running:
            # (Accepted guesses are computed before they are appended to the tokens: keyed next step.)
            num_full = min(seq.num_computed_tokens, seq.num_tokens) // block_size
            if seq.prefix_identity is None or num_full <= seq.num_cached_blocks:
                continue
            hashes = self._block_hashes(seq, num_full)
            for i in range(seq.num_cached_blocks, num_full):
                self.allocator.cache(seq.blocks[i], hashes[i])
            seq.num_cached_blocks = num_full

    # ---- after the step -------------------------------------------------------------------------

    def refused(self, out: SchedulerOutput) -> None:
        """Undoes `out`, which the workers refused whole without changing anything: its requests are
        as before the step (new ones were never sent; running ones give back the blocks they got), so
        each can be scheduled again or finished. Its releases are the caller's to send again. A
        request finished since (aborted, or ended by the step before an overlapped one) gave back
        all its blocks then; if this was its first step, the workers never held it, so its release
        (queued when it finished) is called off."""
        for r in out.scheduled:
            seq = r.seq
            if seq.status is Status.FINISHED:
                # Any release of an earlier life went out with `out` (ahead of its NewRequest): one
                # queued now is this life's, which the refusal ended before the workers saw it.
                if r.is_new and seq.id in self._to_release:
                    self._to_release.remove(seq.id)
                continue
            seq.num_computed_tokens -= r.num_tokens
            seq.draft_token_ids = ()
            if r.is_new:
                seq.is_on_worker = False  # a NewRequest carries its whole block table next time
            elif r.new_blocks:
                del seq.blocks[-len(r.new_blocks) :]
                self.allocator.free(list(r.new_blocks))

    def postprocess(
        self,
        sampled: dict[int, int],
        accepted: dict[int, tuple[int, ...]] | None = None,
        proposed: dict[int, tuple[int, ...]] | None = None,
    ) -> list[SequenceState]:
        """Takes back rejected guesses, keys the blocks the step computed, then appends each
        request's accepted guesses (`accepted`, by id) and sampled token, up to the first that ends
        it; returns the requests that finished by length or EOS. `proposed`: Medusa guesses of the
        tokens after each sampled one, kept for the request's next guess."""
        accepted = accepted or {}
        proposed = proposed or {}
        if self.config.num_speculative_tokens:
            for seq in self.running:
                if seq.draft_token_ids:
                    self._verified(seq, len(accepted.get(seq.id, ())))
        self._cache_computed()
        done = []
        for seq in list(self.running):
            token = sampled.get(seq.id)
            if token is None:
                continue
            seq.proposed_token_ids = proposed.get(seq.id, ())
            for t in (*accepted[seq.id], token) if seq.id in accepted else (token,):
                seq.output_ids.append(t)
                reason = None
                if t in seq.eos_token_ids:
                    reason = FinishReason.EOS_TOKEN
                elif len(seq.output_ids) >= seq.max_new_tokens:
                    reason = FinishReason.LENGTH
                if reason is not None:
                    self.finish(seq, reason)
                    done.append(seq)
                    break
        return done

    def _verified(self, seq: SequenceState, num_accepted: int) -> None:
        """The workers kept `num_accepted` of the request's guesses: the rest were not computed."""
        num_draft = len(seq.draft_token_ids)
        seq.num_computed_tokens -= num_draft - num_accepted
        seq.draft_token_ids = ()
        a = seq.adapter_index
        self.num_draft_tokens[a] = self.num_draft_tokens.get(a, 0) + num_draft
        self.num_accepted_tokens[a] = self.num_accepted_tokens.get(a, 0) + num_accepted
