"""Mixture-of-experts parts against HF transformers' own routers and experts, their slow twin, two
shards against one, and PEFT adapters on experts refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraxpy.worker.adapters import AdapterError, load_peft_adapter
from loraxpy.worker.layers import Shard
from loraxpy.worker.model_config import ModelConfig, MoeConfig
from loraxpy.worker.moe import Experts, experts_reference, route

HIDDEN, EXPERT_SIZE, NUM_EXPERTS, TOP_K = 32, 24, 6, 2


def _hf_config(model_type: str, **extra: object):  # type: ignore[no-untyped-def]
    from transformers import AutoConfig

    sizes = dict(
        hidden_size=HIDDEN,
        intermediate_size=EXPERT_SIZE,
        moe_intermediate_size=EXPERT_SIZE,
        num_experts_per_tok=TOP_K,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    return AutoConfig.for_model(model_type, **{**sizes, **extra})


@pytest.mark.parametrize(
    ("model_type", "extra", "renormalize"),
    [
        ("mixtral", {"num_local_experts": NUM_EXPERTS}, True),
        ("qwen3_moe", {"num_experts": NUM_EXPERTS, "norm_topk_prob": True}, True),
        ("qwen2_moe", {"num_experts": NUM_EXPERTS, "norm_topk_prob": False}, False),
    ],
)
def test_routing_equals_hf_routers(model_type: str, extra: dict, renormalize: bool) -> None:
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    routers = {"mixtral": MixtralTopKRouter, "qwen2_moe": Qwen2MoeTopKRouter, "qwen3_moe": Qwen3MoeTopKRouter}
    torch.manual_seed(0)
    router = routers[model_type](_hf_config(model_type, **extra))
    torch.nn.init.normal_(router.weight)
    x = torch.randn(40, HIDDEN)
    _, hf_weights, hf_ids = router(x)
    weights, ids = route(torch.nn.functional.linear(x, router.weight), TOP_K, renormalize)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights.float(), rtol=0, atol=0)


def _experts(shard: Shard, hf_experts: torch.nn.Module) -> Experts:
    """Our experts loaded from per-expert checkpoint tensors cut out of HF's stacked ones."""
    moe = MoeConfig(num_experts=NUM_EXPERTS, top_k=TOP_K, expert_size=EXPERT_SIZE, renormalize=True)
    experts = Experts(moe, HIDDEN, shard, torch.float32, torch.device("cpu"))
    for e in range(NUM_EXPERTS):
        gate, up = hf_experts.gate_up_proj[e].chunk(2)
        experts.load(f"{e}.gate_proj", "weight", gate)
        experts.load(f"{e}.up_proj", "weight", up)
        experts.load(f"{e}.down_proj", "weight", hf_experts.down_proj[e])
    return experts


def _routings(num_tokens: int) -> dict[str, torch.Tensor]:
    """Expert ids [num_tokens, top_k] in the shapes that break grouping: each token to its own pair,
    all tokens to the same two, one expert taking most, and experts that get no token."""
    g = torch.Generator().manual_seed(3)
    random_pairs = torch.stack([torch.randperm(NUM_EXPERTS, generator=g)[:TOP_K] for _ in range(num_tokens)])
    skewed = random_pairs.clone()
    skewed[: num_tokens * 3 // 4, 0] = 4
    skewed[: num_tokens * 3 // 4, 1] = 1
    return {
        "distinct": random_pairs,
        "identical": torch.tensor([[2, 5]]).expand(num_tokens, -1).contiguous(),
        "skewed": skewed,
        "one-token": random_pairs[:1],
        "no-token": random_pairs[:0],
    }


@pytest.mark.parametrize("routing", ["distinct", "identical", "skewed", "one-token", "no-token"])
def test_grouped_experts_equal_hf_experts_and_the_dense_twin(routing: str) -> None:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    torch.manual_seed(1)
    hf = Qwen3MoeExperts(_hf_config("qwen3_moe", num_experts=NUM_EXPERTS))
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ids = _routings(23)[routing]
    x = torch.randn(ids.shape[0], HIDDEN)
    weights = torch.rand(ids.shape)
    experts = _experts(Shard(), hf)
    with torch.no_grad():
        expected = hf(x, ids, weights)
    got = experts(x, weights, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(experts_reference(experts, x, weights, ids), expected, rtol=1e-5, atol=1e-6)


def test_experts_split_over_two_shards_sum_to_the_whole() -> None:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    torch.manual_seed(2)
    hf = Qwen3MoeExperts(_hf_config("qwen3_moe", num_experts=NUM_EXPERTS))
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ids = _routings(17)["distinct"]
    x, weights = torch.randn(17, HIDDEN), torch.rand(ids.shape)
    whole = _experts(Shard(), hf)(x, weights, ids)
    parts = [_experts(Shard(rank, 2), hf)(x, weights, ids) for rank in range(2)]
    assert parts[0].shape == whole.shape and not torch.allclose(parts[0], whole)
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-5, atol=1e-6)


def test_peft_adapters_on_experts_or_their_gates_are_refused_by_module(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = _hf_config(
        "qwen2_moe",
        num_experts=4,
        shared_expert_intermediate_size=16,
        num_hidden_layers=2,
        mlp_only_layers=[1],
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    model_config = ModelConfig.from_folder(tmp_path / "base")
    assert model_config.moe is not None and model_config.moe.sparse_layers == (True, False)
    targets = {
        # PEFT maps bare MLP names onto the stacked experts (and the shared expert) of transformers 5
        "experts": (["gate_proj", "up_proj", "down_proj"], "model.layers.0.mlp.experts"),
        "shared-gate": (["shared_expert_gate"], "model.layers.0.mlp.shared_expert_gate"),
        "shared-expert": (
            ["layers.0.mlp.shared_expert.down_proj"],
            "model.layers.0.mlp.shared_expert.down_proj",
        ),
        "attention-and-dense-mlp": (
            ["q_proj", "o_proj", "layers.1.mlp.gate_proj", "layers.1.mlp.down_proj"],
            None,
        ),
    }
    for name, (modules, refused) in targets.items():
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        lora = LoraConfig(r=4, target_modules=modules, init_lora_weights=False)
        get_peft_model(base, lora).save_pretrained(tmp_path / name)
        if refused is None:
            adapter = load_peft_adapter(tmp_path / name, model_config, max_rank=8)
            assert set(adapter.weights) == {
                *((layer, t) for layer in (0, 1) for t in ("q_proj", "o_proj")),
                (1, "gate_proj"),
                (1, "down_proj"),
            }
            continue
        with pytest.raises(AdapterError, match="mixture-of-experts layer") as e:
            load_peft_adapter(tmp_path / name, model_config, max_rank=8)
        assert f"targets {refused}," in str(e.value), name


@pytest.mark.parametrize(
    "extra",
    [
        {"decoder_sparse_step": 2, "mlp_only_layers": []},
        {"decoder_sparse_step": 1, "mlp_only_layers": [0, 2]},
        {"decoder_sparse_step": 3, "mlp_only_layers": [1]},
    ],
)
def test_sparse_layers_are_the_ones_hf_builds_experts_for(extra: dict, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    config = _hf_config(
        "qwen2_moe", num_experts=4, shared_expert_intermediate_size=16, num_hidden_layers=4, **extra
    )
    model = AutoModelForCausalLM.from_config(config)
    hf_sparse = tuple(isinstance(layer.mlp, Qwen2MoeSparseMoeBlock) for layer in model.model.layers)
    model.save_pretrained(tmp_path)
    moe = ModelConfig.from_folder(tmp_path).moe
    assert moe is not None and moe.sparse_layers == hf_sparse and any(hf_sparse) and not all(hf_sparse)
    assert (moe.num_experts, moe.top_k, moe.expert_size, moe.shared_expert_size) == (
        4,
        TOP_K,
        EXPERT_SIZE,
        16,
    )


def test_two_shards_hold_a_slice_of_every_expert_and_all_reduce_once_per_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each shard's MoE block (experts and shared expert) holds its half of every expert, and its forward
    calls all-reduce once; the two partial sums it would reduce add up to HF's block."""
    from transformers import AutoModelForCausalLM

    import loraxpy.worker.layers as layers
    from loraxpy.kernels.attention import select_attention_backend
    from loraxpy.worker.model import CausalLM
    from loraxpy.worker.weights import load_weights

    config = _hf_config(
        "qwen2_moe", num_experts=NUM_EXPERTS, shared_expert_intermediate_size=16, norm_topk_prob=False
    )
    torch.manual_seed(4)
    hf = AutoModelForCausalLM.from_config(config)
    for name, p in hf.named_parameters():
        if "mlp" in name:
            torch.nn.init.normal_(p, std=0.2)
    hf.save_pretrained(tmp_path)
    model_config = ModelConfig.from_folder(tmp_path)
    x = torch.randn(9, HIDDEN)
    with torch.no_grad():
        expected = hf.model.layers[0].mlp(x[None])[0]

    reduced: list[torch.Tensor] = []
    monkeypatch.setattr(layers.dist, "all_reduce", lambda t: reduced.append(t.clone()))
    partials = []
    for rank in range(2):
        shard = Shard(rank, 2)
        cpu = torch.device("cpu")
        attention = select_attention_backend(cpu)
        model = CausalLM(model_config, shard=shard, attention=attention, dtype=torch.float32, device=cpu)
        load_weights(model, tmp_path, tied_lm_head=model_config.tie_word_embeddings)
        block = model.layers[0].mlp
        half = EXPERT_SIZE // 2
        assert block.experts.gate_up.shape == (NUM_EXPERTS, 2 * half, HIDDEN)
        assert block.experts.down.shape == (NUM_EXPERTS, HIDDEN, half)
        for e in range(NUM_EXPERTS):  # this rank's rows of gate and up, columns of down, of every expert
            rows = slice(rank * half, (rank + 1) * half)
            gate, up = hf.model.layers[0].mlp.experts.gate_up_proj[e].chunk(2)
            assert torch.equal(block.experts.gate_up[e], torch.cat([gate[rows], up[rows]]))
            assert torch.equal(block.experts.down[e], hf.model.layers[0].mlp.experts.down_proj[e][:, rows])
        assert block.shared_expert.down_proj.weight.shape == (HIDDEN, 8)
        before = len(reduced)
        block(x)
        assert len(reduced) == before + 1, "one all-reduce per MoE layer"
        partials.append(reduced[-1])
    assert not torch.allclose(partials[0], expected)
    torch.testing.assert_close(partials[0] + partials[1], expected, rtol=1e-5, atol=1e-6)
