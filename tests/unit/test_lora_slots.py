"""Adapter slot sizing: the byte count the memory budget uses equals what the slots really take."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraxpy.kernels.attention import select_attention_backend
from loraxpy.worker.layers import Shard
from loraxpy.worker.lora import (
    CPU_MAX_ADAPTER_SLOTS,
    LoraManager,
    fit_slots,
    num_adapter_slots,
    slot_bytes,
    slot_dtype,
)
from loraxpy.worker.model import CausalLM
from loraxpy.worker.model_config import ModelConfig


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> ModelConfig:
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama")
    LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    ).save_pretrained(folder)
    return ModelConfig.from_folder(Path(folder))


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_bytes_equal_the_allocated_slot_tensors(config: ModelConfig, world_size: int, dtype) -> None:
    shard = Shard(rank=world_size - 1, world_size=world_size)
    attention = select_attention_backend(torch.device("cpu"))
    model = CausalLM(config, shard=shard, attention=attention, dtype=dtype, device=torch.device("cpu"))
    num_slots, rank = 3, 8
    manager = LoraManager.attach(model, config, shard, num_slots, rank)
    # device bytes behind every slot tensor, each allocation counted once (slices are views into them)
    tensors = [t for lora in set(manager.slots.values()) for s in lora.slices.values() for t in (s.a, s.b)]
    tensors += [t for lora in set(manager.slots.values()) for t in (lora.a, lora.b)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    per_slot = slot_bytes(config, shard, rank, slot_dtype(dtype, torch.device("cpu")))
    assert sum(storages.values()) == (num_slots + 1) * per_slot  # slot 0: base
    assert sum(t.nbytes for t in tensors) == 2 * sum(storages.values())  # the views cover each stack once


def test_fit_slots_keeps_within_the_budget() -> None:
    assert fit_slots(8, budget_bytes=10 * 100, per_slot=100) == 8
    assert fit_slots(8, budget_bytes=350, per_slot=100) == 3
    assert fit_slots(8, budget_bytes=0, per_slot=100) == 1  # adapters asked for: at least one slot
    assert fit_slots(0, budget_bytes=10**9, per_slot=100) == 0


def test_cpu_slots_are_capped_and_zero_means_no_adapters(config: ModelConfig) -> None:
    cpu = torch.device("cpu")
    assert num_adapter_slots(config, Shard(), 40, 8, torch.float32, cpu, 0.1) == CPU_MAX_ADAPTER_SLOTS
    assert num_adapter_slots(config, Shard(), 5, 8, torch.float32, cpu, 0.1) == 5
    assert num_adapter_slots(config, Shard(), 0, 8, torch.float32, cpu, 0.1) == 0


def _random_adapter(config: ModelConfig, rank: int, targets: tuple[str, ...], seed: int):
    from loraxpy.worker.adapters import LoraAdapter, module_shape

    g = torch.Generator().manual_seed(seed)
    weights, scales = {}, {}
    for layer in range(config.num_layers):
        for t in targets:
            n_in, n_out = module_shape(config, t)
            weights[(layer, t)] = (
                torch.randn(rank, n_in, generator=g),
                torch.randn(n_out, rank, generator=g),
            )
            scales[(layer, t)] = 2.0
    return LoraAdapter(rank, weights, scales)


def test_an_index_given_to_another_adapter_holds_only_the_new_adapters_weights(config: ModelConfig) -> None:
    """The router reuses the index of an adapter that left; the worker's load under that index must
    leave nothing of the old adapter (other modules, higher rank) behind, offloaded first or not."""
    attention = select_attention_backend(torch.device("cpu"))
    cpu = torch.device("cpu")

    def slot_tensors(manager: LoraManager) -> list[torch.Tensor]:
        layers = list({id(lora): lora for _, lora in sorted(manager.slots.items())}.values())  # in key order
        return [t for lora in layers for t in (lora.a, lora.b)]

    old = _random_adapter(config, 8, ("q_proj", "v_proj", "down_proj", "gate_proj"), seed=1)
    new = _random_adapter(config, 4, ("k_proj", "o_proj"), seed=2)

    def manager() -> LoraManager:
        model = CausalLM(config, shard=Shard(), attention=attention, dtype=torch.float32, device=cpu)
        return LoraManager.attach(model, config, Shard(), 2, 8)

    reference = manager()
    reference.load(1, new)
    for offload_first in (True, False):
        reused = manager()
        reused.load(1, old)
        reused.load(2, _random_adapter(config, 8, ("q_proj",), seed=3))  # a neighbour in slot 2
        if offload_first:
            reused.offload(1)
        reused.load(1, new)
        assert reused.index_to_slot[1] == 1 and reused.slot_ranks[1] == 4
        for got, want in zip(slot_tensors(reused), slot_tensors(reference), strict=True):
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
