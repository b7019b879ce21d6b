"""Prefix caching in the router: the allocator's hash chain, reference counts and LRU eviction, and
the scheduler reusing cached blocks (chunked prefill, preemption, prompt log-probs, adapters)."""

from __future__ import annotations

import dataclasses
import hashlib
from array import array

import pytest

from loraxpy.proto.adapter_policy import AdapterPolicy
from loraxpy.proto.sampling import SamplingParams
from loraxpy.router.adapters import AdapterRegistry
from loraxpy.router.config import parse_args
from loraxpy.router.kv_blocks import BlockAllocator, chain_hashes
from loraxpy.router.scheduler import FinishReason, Scheduler, SchedulerConfig, SequenceState
from loraxpy.router.worker_client import AdapterMerge
from loraxpy.worker.batch import Limits, NewRequestData, StepInput, WorkerInputError, validate_step
from loraxpy.worker.sampling import SamplingParams as WorkerSampling

BS = 4


def test_chain_hash_covers_parent_tokens_and_identity() -> None:
    tokens = list(range(10))
    hashes = chain_hashes("base", tokens, BS, [])
    assert len(hashes) == 2  # full blocks only
    root = hashlib.sha256(b"base").digest()
    first = hashlib.sha256(root + array("I", tokens[:4]).tobytes()).digest()
    assert hashes == [first, hashlib.sha256(first + array("I", tokens[4:8]).tobytes()).digest()]
    assert chain_hashes("base", [*tokens, 1, 2], BS, hashes[:1]) == chain_hashes(
        "base", [*tokens, 1, 2], BS, []
    )
    # Same second block after a different first block, or under another identity: other keys.
    assert chain_hashes("base", [9, 9, 9, 9, *tokens[4:8]], BS, [])[1] != hashes[1]
    assert set(chain_hashes("adapter|local|a|", tokens, BS, [])).isdisjoint(hashes)


def cached_allocator(num_blocks: int = 4) -> BlockAllocator:
    return BlockAllocator(num_blocks, BS, enable_caching=True)


def test_cached_blocks_outlive_their_request_and_are_shared_by_reference() -> None:
    alloc = cached_allocator()
    hashes = chain_hashes("base", list(range(8)), BS, [])
    blocks = alloc.allocate(2)
    for b, h in zip(blocks, hashes, strict=True):
        alloc.cache(b, h)
    alloc.free(blocks)
    assert alloc.num_free == 4 and alloc.num_cached == 2
    assert alloc.lookup(hashes) == blocks
    alloc.take_cached(blocks, 2)
    alloc.take_cached(blocks[:1], 2)  # a second request shares the first block
    assert (alloc.num_hits, alloc.num_misses, alloc.num_free) == (3, 1, 2)
    alloc.free(blocks)
    assert alloc.num_free == 3  # the shared block is still held once
    alloc.free(blocks[:1])
    assert alloc.num_free == 4 and alloc.lookup(hashes) == blocks
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free(blocks[:1])


def test_eviction_takes_unkeyed_blocks_first_then_least_recently_used_cached_ones() -> None:
    alloc = cached_allocator(4)
    a = chain_hashes("base", [1] * 8, BS, [])
    b = chain_hashes("base", [2] * 4, BS, [])
    held_a, held_b = alloc.allocate(2), alloc.allocate(1)
    for block, h in zip(held_a + held_b, a + b, strict=True):
        alloc.cache(block, h)
    alloc.free(held_a)  # tail first: a[1] is older than a[0] in the LRU
    alloc.free(held_b)
    assert alloc.allocate(1) not in ([x] for x in held_a + held_b)  # the never-keyed block
    assert alloc.num_evictions == 0
    (evicted,) = alloc.allocate(1)
    assert evicted == held_a[1] and alloc.num_evictions == 1
    assert alloc.lookup(a) == held_a[:1] and alloc.lookup(b) == held_b
    # Taking a cached block makes it most recently used: the next eviction is a[0], not b.
    alloc.take_cached(held_b, 1)
    alloc.free(held_b)
    assert alloc.allocate(1) == held_a[:1] and alloc.lookup(b) == held_b


def test_can_allocate_counts_evictable_blocks_a_request_reuses() -> None:
    alloc = cached_allocator(2)
    hashes = chain_hashes("base", [5] * 4, BS, [])
    (block,) = alloc.allocate(1)
    alloc.cache(block, hashes[0])
    alloc.free([block])
    assert alloc.can_allocate(2) and not alloc.can_allocate(2, reusing=[block])
    assert alloc.can_allocate(1, reusing=[block])


def test_a_key_is_held_by_one_block_and_caching_off_keys_nothing() -> None:
    alloc = cached_allocator()
    h = chain_hashes("base", [3] * 4, BS, [])
    first, second = alloc.allocate(2)
    alloc.cache(first, h[0])
    alloc.cache(second, h[0])  # the same prefix computed twice at once: the first copy is the key
    alloc.free([first, second])
    assert alloc.num_cached == 1 and alloc.lookup(h) == [first]
    off = BlockAllocator(4, BS)
    blocks = off.allocate(1)
    off.cache(blocks[0], h[0])
    assert off.num_cached == 0 and off.lookup(h) == []


# ---- the scheduler --------------------------------------------------------------------------------


def make(num_blocks: int = 64, max_step_tokens: int = 64) -> Scheduler:
    config = SchedulerConfig(max_step_tokens=max_step_tokens)
    return Scheduler(config, BlockAllocator(num_blocks, BS, enable_caching=True))


def seq(i: int, prompt: list[int], identity: str | None = "base", **kw: object) -> SequenceState:
    return SequenceState(id=i, prompt_ids=prompt, max_new_tokens=2, prefix_identity=identity, **kw)  # type: ignore[arg-type]


def step(s: Scheduler, token: int = 7) -> list[tuple[int, int, int]]:
    """One step with a fake model; returns (id, tokens already computed, tokens computed now)."""
    out = s.schedule()
    sampled = {r.seq.id: token for r in out.scheduled if r.seq.num_computed_tokens == r.seq.num_tokens}
    s.postprocess(sampled)
    return [(r.seq.id, r.num_computed_tokens, r.num_tokens) for r in out.scheduled]


SYSTEM = list(range(100, 112))  # three full blocks


def test_a_later_request_starts_after_the_cached_prefix_and_shares_its_blocks() -> None:
    s = make()
    first, second = seq(1, [*SYSTEM, 1, 2]), seq(2, [*SYSTEM, 3])
    first.max_new_tokens = second.max_new_tokens = 5
    s.add(first)
    assert step(s) == [(1, 0, 14)]
    s.add(second)
    assert step(s) == [(1, 14, 1), (2, 12, 1)]
    assert second.blocks[:3] == first.blocks[:3] and second.blocks[3] not in first.blocks
    assert (s.allocator.num_hits, s.allocator.num_misses) == (3, 3)


def test_the_whole_prompt_is_never_taken_from_the_cache() -> None:
    s = make()
    s.add(seq(1, SYSTEM))
    step(s)
    step(s)
    s.add(seq(2, list(SYSTEM)))  # identical: the last block is computed again, for its logits
    assert step(s)[-1] == (2, 8, 4)


def test_no_sharing_across_identities_or_without_one_or_with_prompt_logprobs() -> None:
    s = make()
    s.add(seq(1, [*SYSTEM, 1]))
    step(s)
    s.add(seq(2, [*SYSTEM, 1], identity="adapter|local|b|"))
    s.add(seq(3, [*SYSTEM, 1], identity=None))
    s.add(seq(4, [*SYSTEM, 1], sampling=SamplingParams(prompt_logprobs=True)))
    s.add(seq(5, [*SYSTEM, 1]))
    assert step(s)[1:] == [(2, 0, 13), (3, 0, 13), (4, 0, 13), (5, 12, 1)]


def test_chunked_prefill_of_the_uncached_rest_and_blocks_cached_as_chunks_complete() -> None:
    s = make(max_step_tokens=6)
    s.add(seq(1, SYSTEM + list(range(20))))  # 32 tokens
    assert [step(s) for _ in range(2)] == [[(1, 0, 6)], [(1, 6, 6)]]
    assert s.allocator.num_cached == 3  # 12 tokens computed: three full blocks keyed mid-prompt
    s.add(seq(2, SYSTEM + list(range(50, 59))))  # 21 tokens, the first 12 cached
    steps = [step(s) for _ in range(6)]
    assert steps[:3] == [[(1, 12, 6)], [(1, 18, 6)], [(1, 24, 6)]]
    assert steps[3:] == [[(1, 30, 2), (2, 12, 4)], [(1, 32, 1), (2, 16, 5)], [(2, 21, 1)]]


def test_the_cache_index_stays_within_the_kv_blocks_however_many_prefixes_pass() -> None:
    """The router's memory for cached prefixes is bounded by the KV cache: 400 requests of their own
    prompts under 10 adapters key two full blocks each, 50 times the cache's 16, and the index never
    holds more than 16 (in the 20-minute soak it grew until 8,192 blocks were keyed, about 2.6 MiB
    of the router's memory, then stayed flat)."""
    s = make(num_blocks=16)
    alloc = s.allocator
    for start in range(0, 400, 4):
        for i in range(start, start + 4):
            s.add(seq(i, [1000 + 9 * i + t for t in range(9)], identity=f"adapter|local|a{i % 10}|"))
        while s.running or any(s.waiting.values()):
            step(s)
            assert max(len(alloc._hash_of), len(alloc._by_hash), len(alloc._evictable)) <= 16
    assert alloc.num_hits == 0 and alloc.num_cached == 12  # the last 4 requests' keyed blocks
    assert alloc.num_free == 16  # free or evictable: nothing is held by a finished request


def test_a_preempted_request_reuses_its_own_cached_blocks_and_finishes() -> None:
    s = make(num_blocks=8)
    a, b = seq(1, [*SYSTEM, 1, 2, 3]), seq(2, list(range(200, 215)))
    a.max_new_tokens = b.max_new_tokens = 10
    s.add(a)
    s.add(b)
    step(s)  # 4 + 4 blocks: every block is taken
    step(s)  # 16 tokens each, all computed: four full blocks each, keyed
    assert step(s) == [(1, 16, 1)]  # a needs a fifth block: b (the newest) is preempted
    assert b.num_preemptions == 1 and s.allocator.num_evictions == 1  # b's tail block, freed first
    s.finish(a, FinishReason.ABORTED)
    assert step(s) == [(2, 12, 5)]  # b resumes after its own three cached blocks (prompt + outputs)
    while s.has_work():
        step(s)
    assert b.finish_reason is FinishReason.LENGTH and len(b.output_ids) == 10
    assert s.allocator.num_free == 8


# ---- whose blocks are whose: the adapter registry's identities ----------------------------------


def test_identities_separate_adapters_merges_and_private_hub_tenants_but_never_use_the_index() -> None:
    policy = AdapterPolicy(frozenset({"hub", "local"}), hub_allowed=("operator",))
    reg = AdapterRegistry(None, 2, policy=policy)  # type: ignore[arg-type]
    ident = reg.prefix_identity
    # Local and operator-allowed hub adapters are the operator's: one identity for every tenant.
    assert ident("./x/", "local", "token-a") == ident("x", "local", "token-b") != ident("y", "local")
    assert ident("operator/lora", "hub", "token-a") == ident("operator/lora", "hub")
    assert ident("x", "local") != ident("x", "hub")
    # A hub adapter read with the requester's own token: one identity per tenant.
    private = {ident("org/private", "hub", t) for t in ("token-a", "token-b", "")}
    assert len(private) == 3 and ident("org/private", "hub", "token-a") == ident(
        "org/private", "hub", "token-a"
    )
    assert not any("token-a" in i for i in private)  # a digest, not the secret
    merge = AdapterMerge(("x", "y"), (0.5, 0.5))
    assert ident(merge.key, "local", merge=merge) == ident(
        "ignored", "local", merge=AdapterMerge(("./x", "y"), (0.5, 0.5))
    )
    others = [
        AdapterMerge(("x", "y"), (0.5, 0.25)),
        AdapterMerge(("y", "x"), (0.5, 0.5)),
        AdapterMerge(("x", "y"), (0.5, 0.5), "ties"),
    ]
    assert len({ident(m.key, "local", merge=m) for m in [merge, *others]}) == 4
    private_merge = AdapterMerge(("operator/lora", "org/private"), (1.0, 1.0))
    assert ident("m", "hub", "token-a", private_merge) != ident("m", "hub", "token-b", private_merge)


# ---- the worker's side: where a cached prefix may start ---------------------------------------


def new_request(num_computed: int, num_scheduled: int, blocks: tuple[int, ...], **params: bool) -> StepInput:
    request = NewRequestData(
        id=1,
        token_ids=tuple(range(1, 11)),
        num_prompt_tokens=10,
        params=WorkerSampling(**params),
        adapter_index=0,
        block_table=blocks,
        num_scheduled_tokens=num_scheduled,
        num_computed_tokens=num_computed,
    )
    return StepInput(new_requests=(request,))


def test_the_worker_accepts_a_cached_prefix_only_where_it_can_be_exact() -> None:
    limits = Limits(vocab_size=32, num_blocks=8, block_size=BS, max_model_len=64, max_step_tokens=64)
    validate_step(new_request(8, 2, (5, 6, 7)), {}, limits)
    refusals = [
        (new_request(8, 3, (5, 6, 7)), limits, "only 2 are waiting"),
        (new_request(10, 1, (5, 6, 7)), limits, "only 0 are waiting"),  # the whole prompt cached
        (new_request(8, 2, (5, 6)), limits, "need 3 blocks"),
        (new_request(8, 2, (5, 6, 7), prompt_logprobs=True), limits, "prompt_logprobs needs every"),
        (new_request(8, 2, (5, 6, 7)), dataclasses.replace(limits, can_reuse_prefixes=False), "LongRoPE"),
    ]
    for step_input, lim, message in refusals:
        with pytest.raises(WorkerInputError, match=message):
            validate_step(step_input, {}, lim)


def test_the_flag_is_on_by_default_and_takes_lorax_true_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFIX_CACHING", raising=False)
    assert parse_args([]).prefix_caching and parse_args(["--prefix-caching"]).prefix_caching
    assert not parse_args(["--prefix-caching", "false"]).prefix_caching
    assert parse_args(["--prefix-caching=true", "--json-output"]).json_output  # bare bool flags still work
    monkeypatch.setenv("PREFIX_CACHING", "off")
    assert not parse_args([]).prefix_caching
    with pytest.raises(SystemExit):
        parse_args(["--prefix-caching", "maybe"])
