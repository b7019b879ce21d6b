"""A real `lorax-worker` over gRPC produces HF transformers' greedy tokens and log-probabilities."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from worker_driver import Driver, Request, worker_process

from loraxpy.proto import worker_pb2 as pb

PROMPT_LENS = (5, 17, 33, 9, 26)
JOIN_STEPS = (0, 0, 3, 5, 9)
MAX_NEW_TOKENS = 12


def hf_reference(
    model_path: Path, prompt: list[int], max_new_tokens: int
) -> tuple[list[int], list[float], list[float]]:
    """Greedy tokens, their log-probs, and prompt log-probs (token 1..n-1) from HF transformers
    (each computed once: parametrised tests ask again for the same prompts)."""
    key = (model_path, tuple(prompt), max_new_tokens)
    if key not in _HF_REFERENCES:
        _HF_REFERENCES[key] = _hf_reference(_hf_model(model_path), prompt, max_new_tokens)
    return _HF_REFERENCES[key]


def _hf_reference(
    model: torch.nn.Module, prompt: list[int], max_new_tokens: int
) -> tuple[list[int], list[float], list[float]]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [
        torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens, strict=True)
    ]
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    prompt_lp = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None]).squeeze(1).tolist()
    return tokens, logprobs, prompt_lp


_HF_MODELS: dict[Path, torch.nn.Module] = {}
_HF_REFERENCES: dict[tuple[Path, tuple[int, ...], int], tuple[list[int], list[float], list[float]]] = {}


def _hf_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if path not in _HF_MODELS:
        _HF_MODELS[path] = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        )
    return _HF_MODELS[path]


def make_requests(vocab_size: int, *, prompt_logprobs: bool) -> list[Request]:
    rng = random.Random(7)
    return [
        Request(
            id=i + 1,
            prompt=[rng.randrange(vocab_size) for _ in range(n)],
            max_new_tokens=MAX_NEW_TOKENS,
            join_step=join,
            params=pb.SamplingParams(top_logprobs=3, prompt_logprobs=prompt_logprobs),
        )
        for i, (n, join) in enumerate(zip(PROMPT_LENS, JOIN_STEPS, strict=True))
    ]


def assert_matches_hf(model_path: Path, requests: list[Request]) -> None:
    for r in requests:
        tokens, logprobs, prompt_lp = hf_reference(model_path, r.prompt, r.max_new_tokens)
        assert r.generated == tokens, f"request {r.id} (prompt of {len(r.prompt)})"
        assert r.logprobs == pytest.approx(logprobs, abs=1e-4)
        for (top_id, top_lp), lp, tok in zip(
            (t[0] for t in r.top_logprobs), r.logprobs, r.generated, strict=True
        ):
            assert top_id == tok and top_lp == pytest.approx(lp, abs=1e-6), "greedy token is the most likely"
        if r.params.prompt_logprobs:
            assert sorted(r.prompt_logprobs) == list(range(1, len(r.prompt)))
            ours = [r.prompt_logprobs[j] for j in range(1, len(r.prompt))]
            assert ours == pytest.approx(prompt_lp, abs=1e-4)


@pytest.mark.parametrize(
    ("chunk_sizes", "backend"),
    [((None, 7), "sdpa"), ((7,), "triton")],
    ids=["whole-prompts-and-chunked-prefill", "chunked-prefill-triton-attention"],
)
def test_tiny_models_match_transformers_in_a_continuous_batch(
    tiny_model: tuple[str, Path], chunk_sizes: tuple[int | None, ...], backend: str, tmp_path: Path
) -> None:
    """`triton` runs the Triton store and paged attention (in Triton's interpreter without CUDA).
    One worker per backend serves each chunk size in turn, each on a new (warmed-up) KV cache."""
    if backend == "triton":
        pytest.importorskip("triton", reason="triton is a dev dependency (make install)")
    kind, path = tiny_model
    if kind == "gemma2" and backend == "triton":  # no soft-capping in the Triton kernels: refused at start
        with (
            pytest.raises(RuntimeError, match="soft-caps attention scores: use --attention-backend sdpa"),
            worker_process(path, tmp_path, extra_args=("--attention-backend", backend)),
        ):
            pass
        return
    with worker_process(path, tmp_path, extra_args=("--attention-backend", backend)) as stub:
        info = stub.Info(pb.InfoRequest())
        assert info.model_type == kind and info.attention_backend == backend
        runs = []
        for chunk_size in chunk_sizes:
            warm = stub.Warmup(pb.WarmupRequest(max_prefill_tokens=64, max_num_seqs=8, num_blocks=64))
            driver = Driver(
                stub,
                num_blocks=warm.num_blocks,
                block_size=warm.block_size,
                step_token_budget=64,
                chunk_size=chunk_size,
            )
            runs.append(driver.run(make_requests(info.vocab_size, prompt_logprobs=True)))
            assert driver.allocator.num_free == warm.num_blocks
    for requests in runs:
        assert_matches_hf(path, requests)
