"""Merged adapters against PEFT: its merge functions, and its add_weighted_adapter on a real model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft.utils import merge_utils

from loraxpy.worker.adapter_cache import HostAdapterCache
from loraxpy.worker.adapters import AdapterError, LoraAdapter, load_peft_adapter
from loraxpy.worker.merge import MergeOptions, MergeRequest, combine, merge_adapters
from loraxpy.worker.model_config import ModelConfig

STRATEGIES = ["linear", "ties", "dare_linear", "dare_ties"]


def _peft_combine(
    strategy: str, tensors: list[torch.Tensor], weights: list[float], o: MergeOptions
) -> torch.Tensor:
    w = torch.tensor(weights)
    if strategy == "linear":
        return merge_utils.task_arithmetic(tensors, w)
    if strategy == "ties":
        return merge_utils.ties(tensors, w, o.density, o.majority_sign_method)  # type: ignore[arg-type]
    if strategy == "dare_linear":
        return merge_utils.dare_linear(tensors, w, o.density)
    return merge_utils.dare_ties(tensors, w, o.density, o.majority_sign_method)  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_combine_equals_peft_merge_functions(strategy: str, density: float, sign: str) -> None:
    torch.manual_seed(0)
    tensors = [torch.randn(6, 24) for _ in range(3)]
    weights = [0.8, -0.5, 1.3]
    options = MergeOptions(strategy, density, sign)
    torch.manual_seed(7)  # PEFT's random pruning draws from the global generator
    expected = _peft_combine(strategy, tensors, weights, options)
    got = combine(tensors, weights, strategy, options, torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _tiny_model_and_adapters(tmp: Path) -> tuple[Path, Path, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp / "base")
    specs = {
        "a": (16, ["q_proj", "v_proj", "down_proj", "up_proj"]),
        "b": (8, ["q_proj", "k_proj", "down_proj"]),
    }
    for seed, (name, (alpha, targets)) in enumerate(specs.items()):
        torch.manual_seed(100 + seed)
        model = LlamaForCausalLM.from_pretrained(tmp / "base")
        lora = LoraConfig(r=4, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(tmp / name)
    return tmp / "base", tmp / "a", tmp / "b"


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize(
    ("strategy", "density"), [("linear", 1.0), ("ties", 0.5), ("ties", 1.0), ("dare_linear", 1.0)]
)
def test_merged_deltas_equal_peft_add_weighted_adapter(tmp_path: Path, strategy: str, density: float) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base, a_dir, b_dir = _tiny_model_and_adapters(tmp_path)
    weights = [0.7, -1.4]
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), a_dir, adapter_name="a")
    model.load_adapter(b_dir, adapter_name="b")
    model.add_weighted_adapter(["a", "b"], weights, "m", combination_type=strategy, density=density)

    config = ModelConfig.from_folder(base)
    parts = [load_peft_adapter(d, config, max_rank=64) for d in (a_dir, b_dir)]
    merged = merge_adapters(parts, weights, MergeOptions(strategy, density))
    targets = {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}
    assert {t for _, t in merged.weights} == targets  # the union of both adapters' modules
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "m" not in module.lora_A:
            continue
        layer, target = int(name.split("layers.")[1].split(".")[0]), name.rsplit(".", 1)[1]
        a, b = merged.weights[(layer, target)]
        ours = merged.scales[(layer, target)] * b @ a
        torch.testing.assert_close(ours, module.get_delta_weight("m"), rtol=1e-5, atol=1e-6)


def test_merging_needs_equal_ranks_and_valid_options(tmp_path: Path) -> None:
    a = LoraAdapter(4, {(0, "q_proj"): (torch.ones(4, 8), torch.ones(8, 4))}, {(0, "q_proj"): 1.0})
    b = LoraAdapter(8, {(0, "q_proj"): (torch.ones(8, 8), torch.ones(8, 8))}, {(0, "q_proj"): 1.0})
    with pytest.raises(AdapterError, match="same rank"):
        merge_adapters([a, b], [1.0, 1.0], MergeOptions())
    with pytest.raises(AdapterError, match="one weight per adapter"):
        merge_adapters([a, a], [1.0], MergeOptions())
    with pytest.raises(AdapterError, match="strategy"):
        MergeOptions("svd")
    with pytest.raises(AdapterError, match="density"):
        MergeOptions("ties", 1.5)
    # One adapter is a linear merge whatever the strategy (PEFT's rule): weight·scale, split over A and B.
    single = merge_adapters([a], [0.25], MergeOptions("ties", 0.1))
    got_a, got_b = single.weights[(0, "q_proj")]
    torch.testing.assert_close(got_b @ got_a, 0.25 * torch.ones(8, 4) @ torch.ones(4, 8))


def test_random_pruning_is_the_same_for_the_same_merge() -> None:
    request = MergeRequest(("x", "y"), (0.5, 0.5), MergeOptions("dare_ties", 0.3))
    assert request.seed == MergeRequest(("x", "y"), (0.5, 0.5), MergeOptions("dare_ties", 0.3)).seed
    assert request.seed != MergeRequest(("y", "x"), (0.5, 0.5), MergeOptions("dare_ties", 0.3)).seed
    t = [torch.randn(16, 16), torch.randn(16, 16)]
    first = combine(t, [1.0, 1.0], "dare_ties", request.options, torch.Generator().manual_seed(request.seed))
    again = combine(t, [1.0, 1.0], "dare_ties", request.options, torch.Generator().manual_seed(request.seed))
    assert torch.equal(first, again)


def test_host_cache_evicts_least_recently_used_by_bytes() -> None:
    def adapter(n: int) -> LoraAdapter:  # n·(64 + 64) bytes in fp32
        return LoraAdapter(1, {(0, "q_proj"): (torch.zeros(n, 16), torch.zeros(16, n))}, {(0, "q_proj"): 1.0})

    cache = HostAdapterCache(capacity_bytes=3 * 128)
    cache.put("a", adapter(1))
    cache.put("b", adapter(1))
    cache.put("c", adapter(1))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", adapter(1))  # evicts b, the least recently used
    assert [k for k in ("a", "b", "c", "d") if k in cache] == ["a", "c", "d"]
    cache.put("big", adapter(2))  # 256 bytes: evicts c and a
    assert [k for k in ("a", "b", "c", "d", "big") if k in cache] == ["d", "big"]
    assert cache.nbytes == 3 * 128
    cache.put("huge", adapter(4))  # larger than the whole budget: not kept, nothing evicted
    assert "huge" not in cache and cache.nbytes == 3 * 128
    assert (cache.hits, cache.misses) == (1, 0)
