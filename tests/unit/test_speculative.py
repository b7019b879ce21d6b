"""Speculative decoding (prompt lookup): the router's guesses, the engine handing out verified runs,
and the worker's verification, each against an independent computation.

- PromptLookup against a plain scan of the context.
- The engine with speculation on against the same engine with it off, over a stand-in worker whose
  "model" is a fixed function of the context, verifying guesses as the real worker does and
  checking the router's token accounting step by step: the same tokens, texts and finish reasons
  for requests of several adapters in one batch, some not speculating, with EOS, stop sequences and
  max_new_tokens landing inside accepted runs.
- The worker's verification: greedy runs against one-token sampling at each position (penalties
  included), and sampled runs against the exact distribution (a chi-square test over many seeds,
  which fails for a verifier that accepts too often or resamples the rejected guess).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from dataclasses import dataclass, field

import pytest
import torch

from loraxpy.proto.sampling import SamplingParams
from loraxpy.router.engine import Engine, GenerateInput, TokenEvent
from loraxpy.router.kv_blocks import BlockAllocator
from loraxpy.router.scheduler import FinishReason, Scheduler, SchedulerConfig, SchedulerOutput, SequenceState
from loraxpy.router.speculative import PromptLookup
from loraxpy.router.worker_client import StepReply, StepResult
from loraxpy.worker.sampling import SamplingRow, process_logits, sample
from loraxpy.worker.speculative import DraftRequest, verify

# ---- the router's guesses --------------------------------------------------------------------


def naive_lookup(tokens: list[int], k: int) -> list[int]:
    for n in (3, 2, 1):
        if len(tokens) < n + 1:
            continue
        tail = tokens[-n:]
        for end in range(len(tokens) - 2, n - 2, -1):  # the latest earlier occurrence first
            if tokens[end - n + 1 : end + 1] == tail:
                follow = tokens[end + 1 :]  # the text from there on repeats, as far as it goes
                return (follow * k)[:k]
    return []


def test_prompt_lookup_proposes_what_followed_the_latest_earlier_occurrence() -> None:
    assert PromptLookup().propose([5, 6, 7, 8, 9, 5, 6, 7], 3) == [8, 9, 5]
    assert PromptLookup().propose([1, 2, 3, 4], 3) == []
    assert PromptLookup().propose([1, 2, 3, 2, 3], 5) == [2, 3, 2, 3, 2]  # a loop goes on
    rng = random.Random(0)
    for _ in range(200):
        lookup = PromptLookup()
        tokens = [rng.randrange(6) for _ in range(rng.randrange(1, 6))]
        for _ in range(30):  # the index grows with the tokens, as a request's does
            k = rng.randrange(1, 6)
            assert lookup.propose(tokens, k) == naive_lookup(tokens, k), tokens
            tokens += [rng.randrange(6) for _ in range(rng.randrange(1, 3))]


# ---- the engine over a stand-in worker ---------------------------------------------------------

EOS = 13
STOP = 12  # the text stream of a request with a stop sequence ends at this token
VOCAB = 14


def oracle(context: list[int], adapter: int) -> int:
    """The stand-in model's greedy next token: a function of the last token that changes every 9
    positions (it repeats, so prompt lookup guesses right often and wrong often)."""
    return (context[-1] * 3 + adapter + len(context) // 9) % VOCAB


@dataclass
class _Live:
    tokens: list[int]
    num_computed: int
    adapter: int
    blocks: list[int] = field(default_factory=list)


class OracleWorker:
    """Keeps request state as the real worker does and checks the router's accounting: every step
    continues from the tokens whose K/V it holds, guesses only after a decode's last token, and the
    block table covers what is computed."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.live: dict[int, _Live] = {}

    async def step(
        self, out: SchedulerOutput, metadata: tuple[tuple[str, str], ...] = (), masks: object = None
    ) -> StepReply:
        await asyncio.sleep(0)
        for rid in out.finished_ids:
            del self.live[rid]
        results = []
        for r in out.scheduled:
            seq = r.seq
            if r.is_new:
                assert not r.draft_token_ids
                state = _Live(list(seq.all_token_ids), r.num_computed_tokens, seq.adapter_index)
                self.live[seq.id] = state
            else:
                state = self.live[seq.id]
                assert state.tokens == seq.all_token_ids, "the worker's tokens are the router's"
                assert state.num_computed == seq.num_computed_tokens - r.num_tokens
            state.blocks = list(seq.blocks)
            draft = list(r.draft_token_ids)
            if draft:
                assert state.num_computed == len(state.tokens) - 1 and r.num_tokens == 1 + len(draft)
                assert not seq.sampling.top_logprobs
            end = state.num_computed + r.num_tokens
            assert end <= len(state.tokens) + len(draft)
            assert len(state.blocks) * self.block_size >= end, "blocks for every computed token"
            if end < len(state.tokens):  # a prompt chunk
                state.num_computed = end
                results.append(StepResult(seq.id, end, None, (), 0, ()))
                continue
            accepted: list[int] = []
            for guess in draft:
                if oracle(state.tokens + accepted, state.adapter) != guess:
                    break
                accepted.append(guess)
            token = oracle(state.tokens + accepted, state.adapter)
            state.num_computed = len(state.tokens) + len(accepted)
            state.tokens += [*accepted, token]
            results.append(
                StepResult(
                    seq.id,
                    state.num_computed,
                    (token, -0.25),
                    ((token, -0.25),) if seq.sampling.top_logprobs else (),
                    0,
                    (),
                    accepted_draft_tokens=tuple((t, -0.5) for t in accepted),
                )
            )
        return StepReply(results, 0.0)


class _Text:
    def __init__(self, stop: bool) -> None:
        self.stop = stop

    def push(self, token_id: int) -> tuple[str, bool]:
        return f"w{token_id} ", self.stop and token_id == STOP

    def flush(self) -> str:
        return ""


# (prompt, max_new_tokens, adapter, top_logprobs, stops at STOP, ignores EOS)
REQUESTS = [
    ([1, 2, 3, 1, 2, 3, 1, 2], 40, 0, 0, False, True),
    ([4, 5, 4, 5, 4], 23, 1, 0, False, True),  # max_new_tokens inside a run
    ([2, 7, 2, 7, 2, 7], 37, 2, 2, False, True),  # top log-probs: never speculates
    ([6, 1, 6, 1, 6], 60, 1, 0, True, True),  # a stop sequence
    ([3, 3, 3, 9, 3, 3], 60, 3, 0, False, False),  # EOS
    ([8, 10, 11, 8, 10], 60, 2, 0, True, False),
    (list(range(1, 12)) * 3, 29, 0, 0, False, True),  # a long prompt: prefilled in chunks
]


class MedusaOracleWorker(OracleWorker):
    """OracleWorker with Medusa heads on adapters 1 (they guess right: the oracle's next tokens)
    and 2 (they always guess wrong), proposed as a real worker does when the step asks for them."""

    def __init__(self, block_size: int) -> None:
        super().__init__(block_size)
        self.proposals: dict[int, tuple[int, ...]] = {}  # by request: the last guesses proposed

    async def step(
        self, out: SchedulerOutput, metadata: tuple[tuple[str, str], ...] = (), masks: object = None
    ) -> StepReply:
        for r in out.scheduled:  # a request that guesses after a proposal guesses what was proposed
            proposal = self.proposals.get(r.seq.id)
            if r.draft_token_ids and proposal:
                assert r.draft_token_ids == proposal[: len(r.draft_token_ids)]
        reply = await super().step(out, metadata, masks)
        results = []
        for res in reply.results:
            state = self.live[res.id]
            guesses: tuple[int, ...] = ()
            if res.token is not None and out.num_proposed_tokens and state.adapter in (1, 2):
                context = list(state.tokens)
                for _ in range(out.num_proposed_tokens):
                    context.append(oracle(context, state.adapter) + (state.adapter == 2))
                guesses = tuple(t % VOCAB for t in context[len(state.tokens) :])
            self.proposals[res.id] = guesses
            results.append(dataclasses.replace(res, proposed_draft_tokens=guesses))
        return StepReply(results, reply.worker_seconds)


def run_engine(
    speculative_tokens: int, worker: type[OracleWorker] = OracleWorker
) -> tuple[list[list[tuple[int, str, str | None]]], Scheduler]:
    async def run() -> tuple[list[list[tuple[int, str, str | None]]], Scheduler]:
        config = SchedulerConfig(max_step_tokens=24, num_speculative_tokens=speculative_tokens)
        scheduler = Scheduler(config, BlockAllocator(30, 4, enable_caching=True))  # preempts
        engine = Engine(worker(4), scheduler, frozenset({EOS}))  # type: ignore[arg-type]
        engine.start()

        async def one(prompt: list[int], n: int, adapter: int, top: int, stop: bool, ignore: bool) -> list:
            inp = GenerateInput(
                tuple(prompt), n, SamplingParams(top_logprobs=top), adapter, ignore_eos=ignore
            )
            events = [e async for e in engine.generate(inp, _Text(stop)) if isinstance(e, TokenEvent)]
            return [(e.token_id, e.text, e.finish_reason.value if e.finish_reason else None) for e in events]

        outs = await asyncio.gather(*(one(*r) for r in REQUESTS))
        await engine.stop()
        return list(outs), scheduler

    return asyncio.run(run())


def test_speculation_hands_out_the_same_tokens_texts_and_finish_reasons() -> None:
    plain, _ = run_engine(0)
    spec, scheduler = run_engine(4)
    assert spec == plain
    reasons = [events[-1][2] for events in plain]
    assert reasons[1] == "length" and len(plain[1]) == 23
    assert reasons[3] == "stop_sequence" and reasons[5] in ("stop_sequence", "eos_token")
    assert reasons[4] == "eos_token"
    # Guesses were made and some accepted, for several adapters; none for the top-logprobs request.
    proposed, accepted = scheduler.num_draft_tokens, scheduler.num_accepted_tokens
    assert sum(accepted.values()) > 10 and sum(proposed.values()) > sum(accepted.values())
    assert {a for a, n in accepted.items() if n} >= {0, 1}
    assert scheduler.allocator.num_free == scheduler.allocator.num_blocks  # every block came back
    assert scheduler.num_preemptions > 0  # the cache holds 120 tokens: requests were preempted


def test_medusa_guesses_replace_prompt_lookup_per_adapter_and_change_no_token() -> None:
    plain, _ = run_engine(0, MedusaOracleWorker)
    lookup, by_lookup = run_engine(4)
    medusa, by_heads = run_engine(4, MedusaOracleWorker)
    assert medusa == plain == lookup
    proposed, accepted = by_heads.num_draft_tokens, by_heads.num_accepted_tokens
    # The worker checked that every guess after a proposal was that proposal (not prompt lookup's).
    # Adapter 1's heads guess right: every guess is accepted; adapter 2's always guess wrong.
    assert accepted[1] == proposed[1] > 15 > by_lookup.num_accepted_tokens[1]
    assert proposed[2] > 10 and accepted.get(2, 0) == 0
    # The base and adapter 3 have no heads: prompt lookup guesses for them as before.
    assert accepted[0] > 0 and proposed[3] > 0
    assert by_heads.allocator.num_free == by_heads.allocator.num_blocks


def test_a_run_stops_at_max_new_tokens_and_eos() -> None:
    scheduler = Scheduler(SchedulerConfig(num_speculative_tokens=4), BlockAllocator(16, 4))

    seq = SequenceState(1, [1, 2, 1, 2], max_new_tokens=3, eos_token_ids=frozenset({9}))
    scheduler.add(seq)
    scheduler.schedule()
    scheduler.postprocess({1: 1})
    out = scheduler.schedule()
    # Two more tokens allowed: one guess at most (the step's own token is the other).
    assert out.scheduled[0].draft_token_ids == (2,)
    assert seq.num_computed_tokens == 6
    assert scheduler.postprocess({1: 5}, {1: (2,)}) == [seq]
    assert seq.output_ids == [1, 2, 5] and seq.finish_reason is FinishReason.LENGTH
    seq = SequenceState(2, [3, 4, 5, 6, 3], max_new_tokens=10, eos_token_ids=frozenset({6}))
    scheduler.add(seq)
    scheduler.schedule()
    scheduler.postprocess({2: 4})  # ... 6 3 4: the guesses follow the earlier "3 4"
    out = scheduler.schedule()
    assert out.scheduled[0].draft_token_ids == (5, 6, 3, 4)
    assert scheduler.postprocess({2: 7}, {2: (5, 6, 3)}) == [seq]  # EOS is the second guess
    assert seq.output_ids == [4, 5, 6] and seq.finish_reason is FinishReason.EOS_TOKEN


# ---- the worker's verification -----------------------------------------------------------------


def rows_for(params: SamplingParams, history: list[int], seed: int | None = None) -> SamplingRow:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(params, history, 2, generator)


def test_greedy_verification_matches_one_token_steps_with_penalties() -> None:
    torch.manual_seed(0)
    params = SamplingParams(repetition_penalty=1.8, frequency_penalty=0.7, presence_penalty=0.3)
    for trial in range(60):
        k = 1 + trial % 5
        history = torch.randint(0, 10, (6,)).tolist()
        logits = torch.randn(k + 1, 10) * 2
        # Guesses: each position's one-token greedy choice, with one made wrong in most trials.
        expected: list[int] = []
        for j in range(k + 1):
            row = rows_for(params, history + expected)
            expected.append(sample(logits[j : j + 1], [row]).token_ids[0])
        draft = list(expected[:k])
        wrong = trial % (k + 1)
        if wrong < k:
            draft[wrong] = (draft[wrong] + 1) % 10
        (got,) = verify(logits, [DraftRequest(rows_for(params, history), tuple(draft))])
        tokens = [t for t, _ in got.accepted] + [got.token[0]]
        assert tokens == expected[: min(wrong, k) + 1]
        raw = torch.log_softmax(logits, -1)
        assert [lp for _, lp in (*got.accepted, got.token)] == pytest.approx(
            [raw[j, t].item() for j, t in enumerate(tokens)], abs=1e-5
        )


def chi_square_p(observed: list[int], expected: list[float]) -> float:
    """P-value of Pearson's chi-square test, bins of small expected count pooled."""
    obs, exp = torch.tensor(observed, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
    impossible = exp == 0
    assert obs[impossible].sum() == 0, "a token the distribution excludes was drawn"
    obs, exp = obs[~impossible], exp[~impossible]
    small = exp < 5
    if small.any():
        obs = torch.cat([obs[~small], obs[small].sum()[None]])
        exp = torch.cat([exp[~small], exp[small].sum()[None]])
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(do_sample=True, temperature=0.8),
        SamplingParams(do_sample=True, top_k=5, repetition_penalty=1.3),
    ],
)
def test_sampled_verification_keeps_the_models_distribution(params: SamplingParams) -> None:
    torch.manual_seed(1)
    vocab, history = 8, [3, 1, 4]
    logits = torch.randn(3, vocab) * 1.5
    rows = [rows_for(params, history), rows_for(params, [*history, 2]), rows_for(params, [*history, 2, 5])]
    exact = process_logits(logits, rows).softmax(-1)  # position j's distribution after the guesses
    draft = (2, 5)
    num, batch = 6000, 500
    first = [0] * vocab
    second = [0] * vocab  # given the first guess was accepted
    for start in range(0, num, batch):  # many requests per call, as in a step
        requests = [
            DraftRequest(rows_for(params, history, seed), draft) for seed in range(start, start + batch)
        ]
        for v in verify(logits.repeat(batch, 1), requests):
            tokens = [t for t, _ in v.accepted] + [v.token[0]]
            first[tokens[0]] += 1
            if v.accepted:
                second[tokens[1]] += 1
    assert chi_square_p(first, (exact[0] * num).tolist()) > 1e-3
    n2 = sum(second)
    assert chi_square_p(second, (exact[1] * n2).tolist()) > 1e-3
    # The first guess was accepted in a fair share of runs and rejected in the others.
    assert 0.05 < first[2] / num < 0.95 and n2 > 500


# ---- the flag ----------------------------------------------------------------------------------


def test_the_flag_is_parsed_bounded_and_off_where_the_workers_cannot_verify() -> None:
    from loraxpy.router.config import RouterConfig, parse_args
    from loraxpy.router.launcher import speculative_tokens
    from loraxpy.router.worker_client import WorkerInfo

    assert parse_args([]).speculative_tokens == 0
    config = parse_args(["--speculative-tokens", "5"])
    assert config.speculative_tokens == 5
    for bad in (-1, 33):
        with pytest.raises(ValueError, match="--speculative-tokens"):
            RouterConfig(speculative_tokens=bad)
    info = WorkerInfo(
        "m", "/m", "llama", "float32", "cpu", 1, 100, 64, 16, (), "sdpa", can_reuse_prefixes=True
    )
    assert speculative_tokens(config, info) == 5
    longrope = dataclasses.replace(info, model_type="phi3", can_reuse_prefixes=False)
    assert speculative_tokens(config, longrope) == 0
