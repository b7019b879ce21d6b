"""Speculative decoding on the worker (the ModelRunner in process, tiny Llama, fp32), against HF
transformers and PEFT:

- greedy: requests of four adapters and the base model in one batch, sent guesses of varied
  lengths (some none, some all right, some wrong at one position) each step, give PEFT's greedy
  tokens, and the worker's token count drops the rejected ones (later steps stay exact);
- sampled: the first two tokens after a fixed prompt, drawn with guesses over many seeds, follow
  the distribution HF's logits give (chi-square), at the first position and after an accepted guess.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_worker_lora import INDEX, make_adapters, peft_greedy

from loraxpy.worker.batch import CachedRequestData, NewRequestData, StepInput, WorkerInputError
from loraxpy.worker.runner import ModelRunner, RunnerOptions
from loraxpy.worker.sampling import SamplingParams

BLOCK = 16
NEW_TOKENS = 14
PROMPTS: dict[str | None, list[int]] = {
    None: [5, 17, 3, 99, 41, 8],
    **{name: [7 + i, 60, 2, 33, 150 + i, 9, 11][: 4 + i] for i, name in enumerate(INDEX)},
}


@pytest.fixture(scope="module")
def runner(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelRunner, Path]:
    root = tmp_path_factory.mktemp("spec-adapters")
    make_adapters(tiny_llama, root)
    options = RunnerOptions(dtype=torch.float32, device=torch.device("cpu"), max_loras=5, adapter_root=root)
    r = ModelRunner(tiny_llama, options)
    r.warmup(max_prefill_tokens=2048, max_num_seqs=512, num_blocks=600)
    for name, index in INDEX.items():
        r.load_adapter(index, name, "local")
    return r, root


def test_greedy_tokens_with_guesses_are_pefts(runner: tuple[ModelRunner, Path], tiny_llama: Path) -> None:
    r, root = runner
    names = list(PROMPTS)
    expected = {name: peft_greedy(tiny_llama, root, name, PROMPTS[name], NEW_TOKENS) for name in names}
    new = [
        NewRequestData(
            id=i + 1,
            token_ids=tuple(PROMPTS[name]),
            num_prompt_tokens=len(PROMPTS[name]),
            params=SamplingParams(repetition_penalty=1.0),
            adapter_index=INDEX.get(name, 0) if name else 0,
            block_table=tuple(range(i * 4, i * 4 + 4)),  # 64 tokens: room for the guesses
            num_scheduled_tokens=len(PROMPTS[name]),
        )
        for i, name in enumerate(names)
    ]
    got: dict[int, list[int]] = {i + 1: [] for i in range(len(names))}
    outputs = r.step(StepInput(new_requests=tuple(new)))
    step = 0
    num_accepted = num_rejected = 0
    while True:
        for out in outputs:
            before = len(got[out.id])
            got[out.id] += [t for t, _ in out.accepted_draft_tokens] + [out.token[0]]
            assert out.num_computed_tokens == len(PROMPTS[names[out.id - 1]]) + len(got[out.id]) - 1
            num_accepted += len(out.accepted_draft_tokens)
            assert len(got[out.id]) > before
        live = [rid for rid, tokens in got.items() if len(tokens) < NEW_TOKENS]
        if not live:
            break
        step += 1
        cached = []
        for rid in live:
            truth = expected[names[rid - 1]]
            done = len(got[rid])
            k = min((rid + step) % 5, NEW_TOKENS - done - 1)  # 0: this row does not speculate
            draft = list(truth[done : done + k])
            if k and (rid * step) % 3 == 0:  # one wrong guess: it and the rest are rejected
                wrong = step % k
                draft[wrong] = (draft[wrong] + 1) % 300
                num_rejected += 1
            cached.append(CachedRequestData(rid, (), 1 + len(draft), draft_token_ids=tuple(draft)))
        outputs = r.step(StepInput(cached_requests=tuple(cached)))
    r.step(StepInput(finished_ids=tuple(got)))
    for i, name in enumerate(names):
        assert got[i + 1][:NEW_TOKENS] == expected[name], f"adapter {name}"
    assert num_accepted > 20 and num_rejected > 5


def test_guesses_are_refused_where_they_cannot_be_verified(runner: tuple[ModelRunner, Path]) -> None:
    r, _ = runner
    top = SamplingParams(top_logprobs=2)
    new = NewRequestData(1, (5, 6, 7), 3, top, 0, (0,), 3)
    r.step(StepInput(new_requests=(new,)))
    with pytest.raises(WorkerInputError, match="top_logprobs"):
        r.step(StepInput(cached_requests=(CachedRequestData(1, (), 2, draft_token_ids=(5,)),)))
    with pytest.raises(WorkerInputError, match="decode"):  # num_scheduled must be 1 + guesses
        r.step(StepInput(cached_requests=(CachedRequestData(1, (), 1, draft_token_ids=(5,)),)))
    r.step(StepInput(finished_ids=(1,)))


def hf_probs(tiny_llama: Path, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1:].float()
    ids = torch.tensor([prompt])
    logits = TemperatureLogitsWarper(params.temperature)(ids, logits)
    return TopKLogitsWarper(params.top_k)(ids, logits).softmax(-1)[0]


def chi_square_p(observed: torch.Tensor, expected: torch.Tensor) -> float:
    keep = expected > 0
    assert observed[~keep].sum() == 0, "a token outside the distribution's support was drawn"
    obs, exp = observed[keep].double(), expected[keep].double()
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2, dtype=torch.float64), stat / 2))


def test_sampled_tokens_with_guesses_follow_the_models_distribution(
    runner: tuple[ModelRunner, Path], tiny_llama: Path
) -> None:
    r, _ = runner
    prompt = [5, 17, 3, 99, 41, 8]
    params = SamplingParams(do_sample=True, temperature=0.7, top_k=6)
    p1 = hf_probs(tiny_llama, prompt, params)
    guess1 = int(p1.argmax())
    p2 = hf_probs(tiny_llama, [*prompt, guess1], params)
    guess2 = int(p2.argmax())
    first = torch.zeros(p1.shape[0])
    second = torch.zeros(p1.shape[0])
    batch, rounds = 250, 8
    for round_ in range(rounds):
        ids = range(1000 + round_ * batch, 1000 + (round_ + 1) * batch)
        # The prompt but its last token in one step (nothing sampled), then the last token with the
        # two guesses: the tokens come from verification alone.
        new = tuple(
            NewRequestData(
                rid,
                tuple(prompt),
                len(prompt),
                dataclasses.replace(params, seed=rid),
                0,
                (2 * j, 2 * j + 1),
                len(prompt) - 1,
            )
            for j, rid in enumerate(ids)
        )
        r.step(StepInput(new_requests=new))
        cached = tuple(CachedRequestData(rid, (), 3, draft_token_ids=(guess1, guess2)) for rid in ids)
        for out in r.step(StepInput(cached_requests=cached)):
            tokens = [t for t, _ in out.accepted_draft_tokens] + [out.token[0]]
            first[tokens[0]] += 1
            if out.accepted_draft_tokens:
                second[tokens[1]] += 1
        r.step(StepInput(finished_ids=tuple(ids)))
    num = batch * rounds
    assert chi_square_p(first, p1 * num) > 1e-3
    assert chi_square_p(second, p2 * second.sum()) > 1e-3
    assert 0.05 < first[guess1] / num < 0.95 and second.sum() > 200  # both paths were taken
