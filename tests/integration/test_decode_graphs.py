"""Decode steps through the CUDA-graph path give PEFT's tokens for a mixed batch of adapters.

Without CUDA nothing is captured: the runner runs the graphs' padded eager twin (static buffers,
rows padded to the batch-size bucket, padding rows storing no K/V and attending to nothing, Triton
attention and, in one variant, Triton SGMV over fixed-capacity segments, both in Triton's
interpreter). That is exactly the forward pass a graph captures, so its padding and buffer
handling are checked here; tests/gpu compares the replay with it on CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_worker_lora import ADAPTERS, INDEX, make_adapters, peft_greedy

from loraxpy.worker import lora as worker_lora
from loraxpy.worker.batch import CachedRequestData, NewRequestData, StepInput
from loraxpy.worker.runner import ModelRunner, RunnerOptions
from loraxpy.worker.sampling import SamplingParams

pytest.importorskip("triton", reason="triton is a dev dependency (make install)")

BLOCKS_PER_REQUEST = 4  # of 16 tokens: room for every prompt and its new tokens
PROMPTS = {
    None: [5, 17, 3, 99, 41, 8],
    **{name: [7 + i, 60, 2, 33, 150 + i, 9, 11][: 4 + i] for i, name in enumerate(ADAPTERS)},
}
NEW_TOKENS = 8
EARLY_FINISH = 4  # two requests finish after this many tokens, so the batch drops to a smaller bucket


@pytest.fixture(scope="module")
def adapter_root(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("graph-adapters")
    make_adapters(tiny_llama, root)
    return root


def generate(runner: ModelRunner) -> dict[str | None, list[int]]:
    """Prefills every prompt in one step, then decodes; two requests leave early."""
    runner.warmup(max_prefill_tokens=128, max_num_seqs=8, num_blocks=64)
    for name, index in INDEX.items():
        runner.load_adapter(index, name, "local")
    names = list(PROMPTS)
    new = [
        NewRequestData(
            id=i + 1,
            token_ids=tuple(PROMPTS[name]),
            num_prompt_tokens=len(PROMPTS[name]),
            params=SamplingParams(),
            adapter_index=INDEX.get(name, 0) if name else 0,
            block_table=tuple(range(i * BLOCKS_PER_REQUEST, (i + 1) * BLOCKS_PER_REQUEST)),
            num_scheduled_tokens=len(PROMPTS[name]),
        )
        for i, name in enumerate(names)
    ]
    tokens: dict[int, list[int]] = {r.id: [] for r in new}
    outputs = runner.step(StepInput(new_requests=tuple(new)))
    live = set(tokens)
    for step in range(1, NEW_TOKENS + 1):
        for out in outputs:
            tokens[out.id].append(out.token[0])
        if step == NEW_TOKENS:
            break
        finished = (1, 3) if step == EARLY_FINISH else ()
        live -= set(finished)
        cached = tuple(CachedRequestData(rid, (), 1) for rid in sorted(live))
        outputs = runner.step(StepInput(finished_ids=finished, cached_requests=cached))
    return {name: tokens[i + 1] for i, name in enumerate(names)}


def options(adapter_root: Path, **kwargs: object) -> RunnerOptions:
    return RunnerOptions(
        dtype=torch.float32, device=torch.device("cpu"), max_loras=5, adapter_root=adapter_root, **kwargs
    )


@pytest.mark.parametrize("lora_backend", ["torch", "triton"])
def test_decode_through_the_graph_path_matches_peft(
    tiny_llama: Path, adapter_root: Path, lora_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the Triton SGMV path is otherwise chosen on CUDA only; the slots are laid out for it
    monkeypatch.setattr(worker_lora, "choose_backend", lambda device: lora_backend)
    runner = ModelRunner(
        tiny_llama, options(adapter_root, attention_backend="triton", cuda_graph_max_batch_size=6)
    )
    assert runner.lora is not None and runner.lora.backend == lora_backend
    buckets: list[int] = []
    tokens = _generate_counting_buckets(runner, buckets, monkeypatch)
    # Five rows pad to the bucket of 6, then three rows to the bucket of 4; prefill ran eagerly.
    assert buckets == [6] * (EARLY_FINISH - 1) + [4] * (NEW_TOKENS - EARLY_FINISH)
    for name, got in tokens.items():
        expected = peft_greedy(tiny_llama, adapter_root, name, PROMPTS[name], NEW_TOKENS)
        n = EARLY_FINISH if name in (None, list(ADAPTERS)[1]) else NEW_TOKENS
        assert got[:n] == expected[:n], f"adapter {name}"


def _generate_counting_buckets(
    runner: ModelRunner, buckets: list[int], monkeypatch: pytest.MonkeyPatch
) -> dict[str | None, list[int]]:
    runner.warmup(max_prefill_tokens=128, max_num_seqs=8, num_blocks=64)
    graphs = runner.graphs
    assert graphs is not None and not graphs.is_captured  # CPU: the padded eager twin
    original = graphs.bucket_for

    def bucket_for(num_rows: int) -> int:
        buckets.append(original(num_rows))
        return buckets[-1]

    monkeypatch.setattr(graphs, "bucket_for", bucket_for)
    monkeypatch.setattr(runner, "warmup", lambda *a, **k: 64)  # keep the graphs set up above
    return generate(runner)
