"""Each model family beyond Llama serves PEFT adapters in a mixed batch with PEFT's greedy tokens (and
the base rows with HF transformers')."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model
from worker_driver import Driver, Request, sharded_workers, worker_process

from loraxpy.proto import worker_pb2 as pb
from loraxpy.proto import worker_pb2_grpc

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {"qk-r4": (4, ["q_proj", "k_proj"]), "all-r8": (8, ALL_PROJECTIONS)}
# Fused checkpoints (Phi-3) have fused modules, so PEFT adapters target those names.
FUSED_ADAPTERS = {
    "qk-r4": (4, ["qkv_proj"]),
    "all-r8": (8, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}

# MoE models: attention; Qwen2-MoE also the MLP of its dense layer 1 (named in full: PEFT maps bare
# MLP names onto the experts). Experts, routers and shared experts take no LoRA (refused by name:
# tests/unit/test_moe.py).
MOE_ADAPTERS = {"qk-r4": (4, ["q_proj", "k_proj"]), "all-r8": (8, ["q_proj", "k_proj", "v_proj", "o_proj"])}
QWEN2_MOE_ADAPTERS = {
    "qk-r4": MOE_ADAPTERS["qk-r4"],
    "all-r8": (8, [*MOE_ADAPTERS["all-r8"][1], *(f"layers.1.mlp.{p}" for p in ALL_PROJECTIONS[4:])]),
}


def _write_adapters(base: Path, root: Path, adapters: dict[str, tuple[int, list[str]]]) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for seed, (name, (r, targets)) in enumerate(adapters.items()):
        torch.manual_seed(500 + seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(root / name)


def _peft_greedy(base: Path, adapter: Path | None, prompt: list[int], n: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


@contextmanager
def _workers(
    base: Path, tmp_path: Path, num_shard: int, args: tuple[str, ...]
) -> Iterator[list[worker_pb2_grpc.WorkerStub]]:
    if num_shard == 1:
        with worker_process(base, tmp_path, extra_args=args) as stub:
            yield [stub]
    else:
        with sharded_workers(base, tmp_path, num_shard, extra_args=args) as stubs:
            yield stubs


# MoE families run over two shards (every expert's intermediate dim and Qwen2-MoE's shared expert
# split, LoRA on attention and on Qwen2-MoE's dense layer's row-parallel MLP): test_tensor_parallel's
# two-shard check of them, folded in here to save CI time. Mixtral also runs on one shard, so two
# shards and one both equal HF transformers (and PEFT) through a real worker.
@pytest.mark.parametrize(
    ("kind", "num_shard"),
    [
        ("qwen3", 1),
        ("gemma2", 1),
        ("gemma3_text", 1),
        ("phi3", 1),
        ("mixtral", 1),
        ("mixtral", 2),
        ("qwen2_moe", 2),
        ("qwen3_moe", 2),
    ],
)
def test_mixed_adapter_batch_matches_peft(kind: str, num_shard: int, tmp_path: Path) -> None:
    base = build_tiny_model(kind, tmp_path / kind)
    root = tmp_path / "adapters"
    adapters = {"phi3": FUSED_ADAPTERS, "mixtral": MOE_ADAPTERS, "qwen3_moe": MOE_ADAPTERS}
    _write_adapters(base, root, {**adapters, "qwen2_moe": QWEN2_MOE_ADAPTERS}.get(kind, ADAPTERS))
    names: list[str | None] = [None, "qk-r4", "all-r8", "qk-r4", None, "all-r8"]
    index = {name: i + 1 for i, name in enumerate(ADAPTERS)}
    with _workers(base, tmp_path, num_shard, ("--adapter-root", str(root), "--max-loras", "2")) as stubs:
        assert [s.Info(pb.InfoRequest()).model_type for s in stubs] == [kind] * num_shard
        warmup = pb.WarmupRequest(max_prefill_tokens=64, max_num_seqs=8, num_blocks=32)
        for f in [s.Warmup.future(warmup) for s in stubs]:
            f.result()
        for name, i in index.items():
            for s in stubs:
                spec = pb.AdapterSpec(adapter_id=name, source="local")
                s.LoadAdapter(pb.LoadAdapterRequest(adapter=spec, adapter_index=i))
        rng = random.Random(5)
        requests = [
            Request(
                id=j + 1,
                prompt=[rng.randrange(200) for _ in range(5 + 3 * j)],
                max_new_tokens=8,
                join_step=j // 2,
                adapter_index=index[name] if name else 0,
            )
            for j, name in enumerate(names)
        ]
        Driver(stubs, num_blocks=32, block_size=16, step_token_budget=64, chunk_size=8).run(requests)
    for name, r in zip(names, requests, strict=True):
        assert r.generated == _peft_greedy(base, root / name if name else None, r.prompt, 8), (kind, name)
    same_prompt = _peft_greedy(base, root / "all-r8", requests[0].prompt, 8)
    assert same_prompt != requests[0].generated, "the adapter changes the output"
