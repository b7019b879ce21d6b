"""The batched sampler against HF transformers' logits processors, and seeded sampling's guarantees."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from loraxpy.worker.sampling import (
    SamplingParams,
    SamplingRow,
    apply_token_masks,
    make_generator,
    process_logits,
    sample,
)

VOCAB = 50
CPU = torch.device("cpu")

PARAM_SETS = [
    SamplingParams(),
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(repetition_penalty=0.7),
    SamplingParams(do_sample=True, temperature=0.7),
    SamplingParams(do_sample=True, top_k=5),
    SamplingParams(do_sample=True, top_p=0.8),
    SamplingParams(do_sample=True, typical_p=0.6),
    SamplingParams(
        do_sample=True, temperature=1.5, top_k=20, top_p=0.9, typical_p=0.95, repetition_penalty=1.2
    ),
    SamplingParams(do_sample=True, top_k=1),
    SamplingParams(do_sample=True, top_p=0.01),
]


def hf_processors(p: SamplingParams) -> LogitsProcessorList:
    procs: list = []
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.do_sample:
        if p.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k:
            procs.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            procs.append(TopPLogitsWarper(p.top_p))
        if p.typical_p < 1.0:
            procs.append(TypicalLogitsWarper(p.typical_p))
    return LogitsProcessorList(procs)


def random_rows(params: list[SamplingParams], seed: int = 0) -> tuple[torch.Tensor, list[SamplingRow]]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(params), VOCAB, generator=gen) * 3
    rows = []
    for p in params:
        n = int(torch.randint(1, 12, (1,), generator=gen))
        tokens = torch.randint(0, VOCAB, (n,), generator=gen).tolist()
        rows.append(
            SamplingRow(p, tokens, num_prompt_tokens=max(1, n // 2), generator=make_generator(p, CPU))
        )
    return logits, rows


def test_process_logits_equals_hf_processors_in_one_mixed_batch() -> None:
    logits, rows = random_rows(PARAM_SETS)
    ours = process_logits(logits.clone(), rows)
    for i, row in enumerate(rows):
        expected = hf_processors(row.params)(torch.tensor([row.token_ids]), logits[i : i + 1].clone())[0]
        torch.testing.assert_close(ours[i], expected, msg=f"params {row.params}")


def test_repetition_penalty_sees_token_0_in_a_row_shorter_than_the_batch() -> None:
    # Rows are padded to the longest; the padding must not unmark a token the shorter row has seen.
    p = SamplingParams(repetition_penalty=2.0)
    logits = torch.full((2, VOCAB), 1.0)
    rows = [SamplingRow(p, [5, 0], 1, None), SamplingRow(p, [1, 2, 3, 4, 6, 7], 1, None)]
    out = process_logits(logits, rows)
    for i, row in enumerate(rows):
        expected = hf_processors(p)(torch.tensor([row.token_ids]), logits[i : i + 1].clone())[0]
        torch.testing.assert_close(out[i], expected)


def test_frequency_and_presence_penalties_count_generated_tokens_only() -> None:
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    logits = torch.zeros(1, VOCAB)
    row = SamplingRow(p, token_ids=[3, 3, 9, 4, 4, 4, 7], num_prompt_tokens=3, generator=None)
    out = process_logits(logits, [row])[0]
    expected = torch.zeros(VOCAB)
    expected[4] = -(0.5 * 3 + 0.25)
    expected[7] = -(0.5 * 1 + 0.25)
    torch.testing.assert_close(out, expected)  # prompt tokens 3 and 9 are not penalised


@pytest.mark.parametrize("fused", ["cpu_fused", None])
def test_greedy_rows_take_the_argmax_and_report_raw_logprobs(fused) -> None:
    """Also with the fused CPU ops, whose greedy_logsumexp answers plain greedy batches; a batch
    with a penalised or sampled row keeps the torch path for all its rows."""
    ops = None
    if fused is not None:
        from loraxpy.kernels import cpu_fused

        if (ops := cpu_fused.load()) is None:
            pytest.skip(f"fused CPU ops unavailable: {cpu_fused.unavailable_reason()}")
    for params in (
        [SamplingParams(top_logprobs=3)] * 4,
        [SamplingParams(top_logprobs=3)] * 3 + PARAM_SETS[1:2],
    ):
        logits, rows = random_rows(params)
        out = sample(logits, rows, fused=ops)
        raw = logits.log_softmax(-1)
        processed = process_logits(logits, rows)
        assert out.token_ids == processed.argmax(-1).tolist()
        for i in range(len(rows)):
            assert out.logprobs[i] == pytest.approx(raw[i, out.token_ids[i]].item(), abs=1e-6)
            values, ids = raw[i].topk(rows[i].params.top_logprobs)
            assert [t for t, _ in out.top_logprobs[i]] == ids.tolist()
            assert [lp for _, lp in out.top_logprobs[i]] == pytest.approx(values.tolist(), abs=1e-6)


def _draw(
    params: SamplingParams, logits: torch.Tensor, steps: int, neighbours: list[SamplingParams]
) -> list[int]:
    """Samples `steps` tokens for one seeded row placed among other rows (fresh generators each call)."""
    target = SamplingRow(params, [1, 2], 2, make_generator(params, CPU))
    others = [SamplingRow(p, [5], 1, make_generator(p, CPU)) for p in neighbours]
    tokens = []
    for _ in range(steps):
        batch = [*others[: len(others) // 2], target, *others[len(others) // 2 :]]
        out = sample(logits.expand(len(batch), -1).clone(), batch)
        tokens.append(out.token_ids[len(others) // 2])
    return tokens


def test_same_seed_gives_same_tokens_whatever_the_batch() -> None:
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3))
    p = SamplingParams(do_sample=True, temperature=1.2, seed=1234)
    alone = _draw(p, logits, 40, [])
    crowded = _draw(
        p,
        logits,
        40,
        [SamplingParams(do_sample=True), SamplingParams(), SamplingParams(do_sample=True, seed=5)],
    )
    other_seed = _draw(dataclasses.replace(p, seed=1235), logits, 40, [])
    assert alone == crowded
    assert alone != other_seed


def test_sampled_frequencies_follow_the_processed_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    p = SamplingParams(do_sample=True, temperature=0.8, top_k=4, seed=0)
    expected = process_logits(logits, [SamplingRow(p, [0], 1, None)]).softmax(-1)[0]
    # One row per seed in a single batch: each row's draw is independent of the others.
    n = 20000
    rows = [SamplingRow(dataclasses.replace(p, seed=i), [0], 1, None) for i in range(n)]
    for row in rows:
        row.generator = make_generator(row.params, CPU)
    counts = torch.bincount(
        torch.tensor(sample(logits.expand(n, -1).clone(), rows).token_ids), minlength=6
    ).float()
    assert counts[4:].sum() == 0  # outside top-k: never drawn
    # Each frequency within 5 standard errors of its probability.
    stderr = (expected * (1 - expected) / n).sqrt()
    assert ((counts / n - expected).abs() <= 5 * stderr + 1e-9).all(), (counts / n, expected)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 0.0),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("typical_p", 0.0),
        ("repetition_penalty", 0.0),
        ("frequency_penalty", 2.5),
        ("presence_penalty", -3.0),
        ("seed", -1),
        ("top_logprobs", 21),
    ],
)
def test_invalid_parameters_are_refused_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def _pack(allowed: list[bool]) -> bytes:
    """The wire's packing, written out bit by bit (the slow twin of unpack_token_masks)."""
    out = bytearray(4 * ((len(allowed) + 31) // 32))
    for t, ok in enumerate(allowed):
        if ok:
            out[t // 8] |= 1 << (t % 8)
    return bytes(out)


def test_token_masks_apply_bit_for_bit_and_an_empty_mask_changes_nothing() -> None:
    gen = torch.Generator().manual_seed(7)
    wanted = (torch.rand(3, VOCAB, generator=gen) < 0.3).tolist()
    logits = torch.randn(3, VOCAB, generator=gen)
    for masks in ([_pack(wanted[0]), b"", _pack(wanted[2])], [_pack(w) for w in wanted]):
        masked = apply_token_masks(logits, masks)
        for i, mask in enumerate(masks):
            if not mask:
                assert torch.equal(masked[i], logits[i])
                continue
            for t in range(VOCAB):
                expected = logits[i, t].item() if wanted[i][t] else float("-inf")
                assert masked[i, t].item() == expected
    assert apply_token_masks(logits, [b"", b"", b""]) is logits


@pytest.mark.parametrize("params", PARAM_SETS, ids=str)
def test_masked_rows_choose_only_allowed_tokens_and_unmasked_rows_are_unchanged(params) -> None:
    logits, rows = random_rows([params, params], seed=3)
    only = [3, 17, 41]
    masks = [_pack([t in only for t in range(VOCAB)]), b""]
    for row in rows:
        if row.generator is not None:
            row.generator.manual_seed(5)
    masked = sample(logits, rows, masks)
    for row in rows:
        if row.generator is not None:
            row.generator.manual_seed(5)
    plain = sample(logits, rows)
    assert masked.token_ids[0] in only
    if not params.do_sample:  # greedy under a mask: the best allowed token after penalties
        best = process_logits(logits, rows)[0, only].argmax()
        assert masked.token_ids[0] == only[int(best)]
    assert masked.token_ids[1] == plain.token_ids[1]
    assert masked.logprobs[1] == plain.logprobs[1]
