"""What a CUDA worker does at startup, on a real GPU (skipped without CUDA): the self-check of its
fast paths passes and keeps them, and an NCCL group of one shard forms and runs its collectives,
also inside a captured graph (tensor-parallel decode graphs capture their all-reduces)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_warmup_self_check_keeps_every_fast_path_on_a_working_gpu(tiny_llama: Path, dtype) -> None:
    from loraxpy.worker.runner import ModelRunner, RunnerOptions
    from loraxpy.worker.self_check import active_paths

    options = RunnerOptions(
        dtype=dtype, device=CUDA, max_loras=4, max_lora_rank=16, cuda_graph_max_batch_size=8
    )
    runner = ModelRunner(tiny_llama, options)
    runner.warmup(max_prefill_tokens=128, max_num_seqs=8, num_blocks=32)
    assert runner.self_check.is_kernels_checked and runner.self_check.failures == {}
    paths = active_paths(runner.attention_backend, runner.lora, runner.graphs)
    assert paths == {"attention": "triton", "lora": "triton", "decode": "cuda-graphs"}


def test_an_nccl_group_of_one_shard_runs_its_collectives_eagerly_and_in_a_graph(monkeypatch) -> None:
    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    torch.cuda.set_device(CUDA)
    dist.init_process_group("nccl", init_method="env://", rank=0, world_size=1)
    try:
        assert dist.get_backend() == "nccl"
        x = torch.randn(1024, device=CUDA)
        want = x.clone()
        dist.all_reduce(x)
        parts = [torch.empty_like(x)]
        dist.all_gather(parts, x)
        torch.testing.assert_close(parts[0], want)
        graph, static = torch.cuda.CUDAGraph(), torch.randn(256, device=CUDA)
        dist.all_reduce(static)  # NCCL's first call outside capture (communicator setup)
        with torch.cuda.graph(graph):
            dist.all_reduce(static)
            out = static * 2
        static.copy_(torch.arange(256.0, device=CUDA))
        graph.replay()
        torch.testing.assert_close(out, torch.arange(256.0, device=CUDA) * 2)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_worker_asked_for_flash_attention_passes_the_self_check_and_serves_through_it(
    tiny_llama: Path, dtype
) -> None:
    """Where flash-attn or vllm-flash-attn is importable: at its block size the self-check keeps it."""
    from loraxpy.kernels import attention_flash
    from loraxpy.worker.runner import ModelRunner, RunnerOptions

    library = attention_flash.find_library()
    if library is None:
        pytest.skip("neither flash-attn nor vllm-flash-attn is importable (the GPU image has neither)")
    block = library.block_multiple
    options = RunnerOptions(
        dtype=dtype, device=CUDA, max_loras=0, attention_backend="flash", block_size=block
    )
    runner = ModelRunner(tiny_llama, options)
    runner.warmup(max_prefill_tokens=128, max_num_seqs=8, num_blocks=-(-2048 // block))
    assert runner.self_check.failures == {}
    assert runner.attention_backend == library.name
