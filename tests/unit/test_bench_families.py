"""lorax-bench's family shapes: at full depth they are the published models (parameter counts of
HF transformers' own model built from each config, on the meta device), and at toy widths the files
the bench writes (model by HF transformers, adapters on the family's LoRA targets) load in the worker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraxpy.bench.shapes import FAMILY_SHAPES, write_random_adapter, write_random_model
from loraxpy.kernels.attention import select_attention_backend
from loraxpy.worker.adapters import load_peft_adapter
from loraxpy.worker.layers import Shard
from loraxpy.worker.model import CausalLM
from loraxpy.worker.model_config import ModelConfig
from loraxpy.worker.weights import load_weights

# Parameters of each published model (its model card), in billions.
PUBLISHED = {
    "qwen3-8b": 8.19,
    "gemma2-9b": 9.24,
    "phi3-mini": 3.82,
    "mixtral-8x7b": 46.7,
    "qwen3-30b-a3b": 30.5,
}


@pytest.mark.parametrize("name", sorted(FAMILY_SHAPES))
def test_at_full_depth_each_shape_is_the_published_model(name: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = FAMILY_SHAPES[name]
    assert shape.full_layers is not None and shape.num_layers < shape.full_layers
    config = AutoConfig.for_model(
        shape.model_type, **{**shape.family_config(), "num_hidden_layers": shape.full_layers}
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions == pytest.approx(PUBLISHED[name], rel=0.01)


@pytest.mark.parametrize("name", sorted(FAMILY_SHAPES))
def test_the_bench_files_of_each_family_load_in_the_worker(name: str, tmp_path: Path) -> None:
    shape = FAMILY_SHAPES[name].tiny()
    path = write_random_model(shape, tmp_path / "model", torch.float32)
    config = ModelConfig.from_folder(path)
    assert config.model_type == shape.model_type and config.head_dim == shape.head_dim
    assert (config.moe is not None) == ("num_experts_per_tok" in shape.extra)
    cpu = torch.device("cpu")
    model = CausalLM(
        config, shard=Shard(), attention=select_attention_backend(cpu), dtype=torch.float32, device=cpu
    )
    load_weights(model, path, tied_lm_head=config.tie_word_embeddings)
    adapter = load_peft_adapter(
        write_random_adapter(shape, tmp_path / "adapter", 4, torch.float32, seed=1), config, max_rank=8
    )
    assert {t for _, t in adapter.weights} == {
        p
        for t in shape.targets
        for p in {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}.get(
            t, (t,)
        )
    }
