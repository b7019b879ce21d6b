"""A step's requests as plain dataclasses, their validation, and the tensors of one forward pass."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch

from loraxpy.worker.sampling import SamplingParams


class WorkerInputError(ValueError):
    """A Step or RPC the worker refuses without changing any state; the message says what is wrong."""


@dataclass(frozen=True)
class NewRequestData:
    id: int
    token_ids: tuple[int, ...]
    num_prompt_tokens: int
    params: SamplingParams
    adapter_index: int
    block_table: tuple[int, ...]
    num_scheduled_tokens: int
    allowed_token_mask: bytes = b""  # packed bits of the tokens this step may sample; empty: any
    is_embedding: bool = False  # pool the prompt's hidden states instead of sampling (one step)
    num_computed_tokens: int = 0  # a cached prefix: its K/V are in the first blocks already


@dataclass(frozen=True)
class CachedRequestData:
    id: int
    new_block_ids: tuple[int, ...]
    num_scheduled_tokens: int
    allowed_token_mask: bytes = b""
    # Speculative decoding: guessed tokens after the last one, computed and verified in this step.
    draft_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class StepInput:
    finished_ids: tuple[int, ...] = ()
    new_requests: tuple[NewRequestData, ...] = ()
    cached_requests: tuple[CachedRequestData, ...] = ()
    # Medusa speculation: guesses to propose per sampled token, for adapters with heads (0: none).
    num_proposed_tokens: int = 0

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(r.num_scheduled_tokens for r in self.new_requests) + sum(
            r.num_scheduled_tokens for r in self.cached_requests
        )


@dataclass
class RequestState:
    """What the worker remembers of a live request between steps."""

    id: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    adapter_index: int
    block_table: list[int]
    generator: torch.Generator | None
    num_computed_tokens: int = 0
    allowed_token_mask: bytes = b""  # this step's (structured output); empty: any token
    # LongRoPE: this step recomputes the whole sequence with the long table (see ModelRunner.step).
    recomputing: bool = False
    is_embedding: bool = False
    # This step's guesses (speculative decoding), appended to token_ids until they are verified.
    draft_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class RequestOutputData:
    id: int
    num_computed_tokens: int
    token: tuple[int, float] | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    prompt_logprobs_start: int = 0
    prompt_logprobs: tuple[float, ...] = ()
    embedding: tuple[float, ...] = ()  # an embedding request's pooled vector
    accepted_draft_tokens: tuple[tuple[int, float], ...] = ()  # verified guesses, before `token`
    proposed_draft_tokens: tuple[int, ...] = ()  # Medusa heads' guesses of the tokens after `token`


@dataclass(frozen=True)
class Limits:
    """What a Step may ask of this worker; set at warmup."""

    vocab_size: int
    num_blocks: int
    block_size: int
    max_model_len: int
    max_step_tokens: int
    can_reuse_prefixes: bool = True  # False under LongRoPE: K/V depend on the prompt's length


def validate_step(
    step: StepInput, live: dict[int, RequestState], limits: Limits, loaded_adapters: Collection[int] = ()
) -> None:
    """Raises WorkerInputError for anything wrong with `step`, before the worker changes any state."""
    finished = set(step.finished_ids)
    if len(finished) != len(step.finished_ids):
        raise WorkerInputError("finished_ids lists a request twice")
    unknown = finished - live.keys()
    if unknown:
        raise WorkerInputError(f"finished_ids names unknown request(s) {sorted(unknown)}")
    seen: set[int] = set()
    for new in step.new_requests:
        if (new.id in live and new.id not in finished) or new.id in seen:
            raise WorkerInputError(f"request {new.id} is already live; new request ids must be unique")
        seen.add(new.id)
        _validate_new(new, limits)
        _validate_mask(new.id, new.allowed_token_mask, limits)
        if new.adapter_index and new.adapter_index not in loaded_adapters:
            raise WorkerInputError(f"request {new.id}: adapter index {new.adapter_index} is not loaded")
    for cached in step.cached_requests:
        if cached.id not in live or cached.id in finished:
            raise WorkerInputError(f"request {cached.id} is unknown (never sent, or already released)")
        if cached.id in seen:
            raise WorkerInputError(f"request {cached.id} is scheduled twice in one step")
        seen.add(cached.id)
        _validate_cached(cached, live[cached.id], limits)
        _validate_mask(cached.id, cached.allowed_token_mask, limits)
        if cached.draft_token_ids:
            _validate_draft(cached, live[cached.id], limits)
    if step.num_scheduled_tokens > limits.max_step_tokens:
        raise WorkerInputError(
            f"step schedules {step.num_scheduled_tokens} tokens, more than the {limits.max_step_tokens} "
            "profiled at warmup"
        )


def _validate_mask(rid: int, mask: bytes, limits: Limits) -> None:
    expected = 4 * ((limits.vocab_size + 31) // 32)
    if mask and len(mask) != expected:
        raise WorkerInputError(
            f"request {rid}: allowed_token_mask has {len(mask)} bytes; the vocabulary of "
            f"{limits.vocab_size} tokens needs {expected}"
        )


def _validate_new(new: NewRequestData, limits: Limits) -> None:
    rid = new.id
    if not new.token_ids:
        raise WorkerInputError(f"request {rid}: token_ids is empty")
    bad = [t for t in new.token_ids if t >= limits.vocab_size]
    if bad:
        raise WorkerInputError(
            f"request {rid}: token id {bad[0]} is out of the vocabulary [0, {limits.vocab_size})"
        )
    if len(new.token_ids) > limits.max_model_len:
        raise WorkerInputError(
            f"request {rid}: {len(new.token_ids)} tokens exceed the model's {limits.max_model_len} positions"
        )
    if new.num_prompt_tokens > len(new.token_ids):
        raise WorkerInputError(f"request {rid}: num_prompt_tokens exceeds the number of token_ids")
    if new.is_embedding and new.num_scheduled_tokens != len(new.token_ids):
        raise WorkerInputError(f"request {rid}: an embedding computes its whole prompt in one step")
    if new.num_computed_tokens and not limits.can_reuse_prefixes:
        raise WorkerInputError(
            f"request {rid}: this model's K/V depend on the prompt's length (LongRoPE); "
            "a cached prefix (num_computed_tokens) cannot be reused"
        )
    if new.num_computed_tokens and new.params.prompt_logprobs:
        raise WorkerInputError(
            f"request {rid}: prompt_logprobs needs every prompt token computed, not a cached prefix"
        )
    _validate_schedule(
        rid, new.num_computed_tokens, len(new.token_ids), new.num_scheduled_tokens, new.block_table, limits
    )


def _validate_cached(cached: CachedRequestData, state: RequestState, limits: Limits) -> None:
    total = state.num_computed_tokens + cached.num_scheduled_tokens
    if total > limits.max_model_len:
        raise WorkerInputError(
            f"request {cached.id}: {total} tokens exceed the model's {limits.max_model_len} positions"
        )
    blocks = (*state.block_table, *cached.new_block_ids)
    _validate_schedule(
        cached.id,
        state.num_computed_tokens,
        len(state.token_ids) + len(cached.draft_token_ids),
        cached.num_scheduled_tokens,
        blocks,
        limits,
    )


def _validate_draft(cached: CachedRequestData, state: RequestState, limits: Limits) -> None:
    rid, draft = cached.id, cached.draft_token_ids
    if state.num_computed_tokens != len(state.token_ids) - 1 or cached.num_scheduled_tokens != 1 + len(draft):
        raise WorkerInputError(
            f"request {rid}: draft tokens go with a decode: the last token and the drafts, all computed now"
        )
    bad = [t for t in draft if t >= limits.vocab_size]
    if bad:
        raise WorkerInputError(f"request {rid}: draft token {bad[0]} is out of the vocabulary")
    if cached.allowed_token_mask or state.params.top_logprobs or state.is_embedding:
        raise WorkerInputError(
            f"request {rid}: draft tokens cannot be verified with an allowed-token mask or top_logprobs"
        )
    if not limits.can_reuse_prefixes:
        raise WorkerInputError(f"request {rid}: draft tokens are not verified under LongRoPE")


def _validate_schedule(
    rid: int, num_computed: int, num_tokens: int, num_scheduled: int, blocks: tuple[int, ...], limits: Limits
) -> None:
    if num_scheduled < 1:
        raise WorkerInputError(f"request {rid}: num_scheduled_tokens must be at least 1")
    if num_computed + num_scheduled > num_tokens:
        raise WorkerInputError(
            f"request {rid}: schedules {num_scheduled} tokens but only {num_tokens - num_computed} "
            "are waiting to be computed"
        )
    bad = [b for b in blocks if b >= limits.num_blocks]
    if bad:
        raise WorkerInputError(f"request {rid}: block id {bad[0]} is out of range [0, {limits.num_blocks})")
    if len(set(blocks)) != len(blocks):
        raise WorkerInputError(f"request {rid}: block table lists a block twice")
    needed = -(-(num_computed + num_scheduled) // limits.block_size)
    if len(blocks) < needed:
        raise WorkerInputError(
            f"request {rid}: {num_computed + num_scheduled} tokens need {needed} blocks, "
            f"block table has {len(blocks)}"
        )


@dataclass
class BatchPlan:
    """Host-side description of one forward pass, turned into tensors by `ModelRunner._forward_batch`."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    # Row of the flattened token dim whose logits sample each request's next token (or -1).
    sample_rows: list[int] = field(default_factory=list)
    # Per token, max(prompt length, its sequence's length after this step): the length HF's LongRoPE
    # chooses its table by when it generates the request alone (the whole prompt in one forward).
    rope_lengths: list[int] = field(default_factory=list)


def plan_batch(scheduled: list[tuple[RequestState, int]], block_size: int) -> BatchPlan:
    """Lays out the scheduled tokens of every request back to back (prefill chunks and decodes alike)."""
    plan = BatchPlan()
    for state, num_scheduled in scheduled:
        start = state.num_computed_tokens
        end = start + num_scheduled
        row0 = len(plan.input_ids)
        plan.input_ids.extend(state.token_ids[start:end])
        plan.positions.extend(range(start, end))
        plan.rope_lengths.extend([max(state.num_prompt_tokens, end)] * num_scheduled)
        plan.slot_mapping.extend(
            state.block_table[p // block_size] * block_size + p % block_size for p in range(start, end)
        )
        plan.query_lens.append(num_scheduled)
        plan.seq_lens.append(end)
        plan.block_tables.append(state.block_table)
        plan.sample_rows.append(row0 + num_scheduled - 1 if end == len(state.token_ids) else -1)
    return plan
