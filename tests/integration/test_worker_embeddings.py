"""Embeddings on a real worker (NewRequest.is_embedding): a prompt's final hidden states pooled as
the model folder's sentence-transformers config says equal HF transformers' AutoModel with the same
pooling (and PEFT's model for an adapter) within 1e-5 in fp32, whatever else shares the step;
nothing is sampled, and a request that would not compute its whole prompt in one step is refused."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from worker_driver import worker_process

from loraxpy.proto import worker_pb2 as pb
from loraxpy.proto import worker_pb2_grpc

pytestmark = pytest.mark.slow

PROMPTS = [[5, 17, 3, 88, 41], [9, 2], [130, 7, 7, 7, 21, 64, 3, 11, 250, 6, 1, 42, 17, 99, 4, 8, 31, 12]]
BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def mean_pooled(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama as a sentence-transformers folder: mean pooling, then normalisation; one adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("embedder") / "model"
    shutil.copytree(tiny_llama, path)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    pooling = {
        "word_embedding_dimension": 64,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_lasttoken": False,
    }
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(path.parent / "adapters" / "emb")
    return path


@pytest.fixture(scope="module")
def worker(
    mean_pooled: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[worker_pb2_grpc.WorkerStub]:
    root = mean_pooled.parent / "adapters"
    with worker_process(
        mean_pooled, tmp_path_factory.mktemp("sock"), extra_args=("--adapter-root", str(root))
    ) as s:
        s.Warmup(pb.WarmupRequest(max_prefill_tokens=128, max_num_seqs=8, num_blocks=32))
        spec = pb.AdapterSpec(adapter_id="emb", source="local")
        s.LoadAdapter(pb.LoadAdapterRequest(adapter=spec, adapter_index=1))
        yield s


def reference(path: Path, ids: list[int], adapter: bool) -> torch.Tensor:
    """HF transformers' final hidden states (PEFT's model for the adapter), mean-pooled and normalised."""
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM

    if adapter:
        causal = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model = PeftModel.from_pretrained(causal, path.parent / "adapters" / "emb").base_model.model.model
    else:
        model = AutoModel.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]  # [num_tokens, hidden]
    return torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)


def embed(
    stub: worker_pb2_grpc.WorkerStub, requests: list[tuple[int, list[int], int]]
) -> dict[int, list[float]]:
    """One step of embedding requests (id, token ids, adapter index), then a step that releases them."""
    step = pb.StepRequest()
    next_block = 0
    for rid, ids, adapter_index in requests:
        num_blocks = -(-len(ids) // BLOCK_SIZE)
        step.new_requests.append(
            pb.NewRequest(
                id=rid,
                token_ids=ids,
                adapter_index=adapter_index,
                block_table=range(next_block, next_block + num_blocks),
                num_scheduled_tokens=len(ids),
                is_embedding=True,
            )
        )
        next_block += num_blocks
    response = stub.Step(step)
    stub.Step(pb.StepRequest(finished_ids=[rid for rid, _, _ in requests]))
    for out in response.outputs:
        assert not out.HasField("token") and out.num_computed_tokens == len(
            dict((r, i) for r, i, _ in requests)[out.id]
        )
    return {out.id: list(out.embedding) for out in response.outputs}


def test_embeddings_equal_hf_and_peft_alone_and_batched(
    worker: worker_pb2_grpc.WorkerStub, mean_pooled: Path
) -> None:
    batched = embed(worker, [(10 + i, ids, i % 2) for i, ids in enumerate(PROMPTS)])
    for i, ids in enumerate(PROMPTS):
        alone = embed(worker, [(20 + i, ids, i % 2)])[20 + i]
        expected = reference(mean_pooled, ids, adapter=i % 2 == 1)
        torch.testing.assert_close(torch.tensor(alone), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.tensor(batched[10 + i]), expected, rtol=0, atol=1e-5)
    base, adapted = embed(worker, [(30, PROMPTS[0], 0), (31, PROMPTS[0], 1)]).values()
    assert (torch.tensor(base) - torch.tensor(adapted)).abs().max() > 1e-3  # the adapter changes the vector


def test_an_embedding_that_would_not_compute_its_whole_prompt_in_one_step_is_refused(
    worker: worker_pb2_grpc.WorkerStub,
) -> None:
    chunk = pb.NewRequest(
        id=40, token_ids=PROMPTS[2], block_table=[0, 1], num_scheduled_tokens=8, is_embedding=True
    )
    with pytest.raises(grpc.RpcError) as e:
        worker.Step(pb.StepRequest(new_requests=[chunk]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "whole prompt" in str(e.value.details())
    assert len(embed(worker, [(41, PROMPTS[1], 0)])[41]) == 64  # the worker serves on
