"""Tiny random Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 and 3 / Phi-3 / Mixtral / Qwen2-MoE / Qwen3-MoE
checkpoints written by HF transformers itself (the oracle)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from launcher_process import Launcher, launcher
from otlp_receiver import OtlpReceiver

TINY_CONFIGS: dict[str, dict] = {
    # llama3 RoPE scaling, untied head, and a sharded checkpoint (index json) exercise the loader.
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        max_position_embeddings=256,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        tie_word_embeddings=False,
    ),
    # Sliding window shorter than the prompts, GQA 4:1.
    "mistral": dict(
        model_type="mistral",
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=300,
        max_position_embeddings=256,
        sliding_window=8,
        tie_word_embeddings=False,
    ),
    # qkv bias, tied embeddings, sliding window on the second layer only.
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=288,
        max_position_embeddings=256,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        tie_word_embeddings=True,
    ),
    # q/k norms per head, head_dim wider than hidden / heads, tied embeddings.
    "qwen3": dict(
        model_type="qwen3",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=272,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
    # Gemma 3: (1 + w) norms around attention and the MLP, GeGLU, scaled embeddings and queries,
    # q/k norms, sliding layers (window shorter than the prompts) with their own RoPE base, tied head.
    "gemma3_text": dict(
        model_type="gemma3_text",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=264,
        max_position_embeddings=256,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24,
        tie_word_embeddings=True,
    ),
    # Gemma 2: soft-capped attention scores and logits, sandwich norms, GeGLU, alternating windows.
    "gemma2": dict(
        model_type="gemma2",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=296,
        max_position_embeddings=256,
        sliding_window=8,
        query_pre_attn_scalar=20,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
        tie_word_embeddings=True,
    ),
    # Phi-3: fused qkv_proj and gate_up_proj in the checkpoint, RoPE on half of each head (Phi-4-mini's
    # partial_rotary_factor), a sliding window shorter than the prompts.
    "phi3": dict(
        model_type="phi3",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=280,
        max_position_embeddings=256,
        partial_rotary_factor=0.5,
        sliding_window=8,
        tie_word_embeddings=False,
        # LongRoPE with an original context of 16: prompts within it and beyond it, and requests
        # that cross it while decoding, each take the table HF's forward would.
        original_max_position_embeddings=16,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0, 1.3, 1.7, 2.2],
            "long_factor": [1.5, 2.5, 4.0, 6.0],
        },
    ),
    # Mixtral: 4 experts, top-2 always renormalised, a sliding window shorter than the prompts.
    "mixtral": dict(
        model_type="mixtral",
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=304,
        max_position_embeddings=256,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        tie_word_embeddings=False,
    ),
    # Qwen2-MoE: top-2 of 4 experts not renormalised, a gated shared expert, qkv bias, and a dense
    # MLP layer (mlp_only_layers) after the sparse one.
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=312,
        max_position_embeddings=256,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        mlp_only_layers=[1],
        tie_word_embeddings=False,
    ),
    # Qwen3-MoE: top-2 of 4 experts renormalised (norm_topk_prob), q/k norms, head_dim 32.
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=328,
        max_position_embeddings=256,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        tie_word_embeddings=False,
    ),
}
MOE_KINDS = ("mixtral", "qwen2_moe", "qwen3_moe")


def build_tiny_model(kind: str, path: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_CONFIGS[kind])
    config = AutoConfig.for_model(
        spec.pop("model_type"),
        **spec,
        initializer_range=0.1,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Norms start constant: random ones tell each norm apart. MoE routers may start at 0 (ties).
    if kind in ("qwen3", "gemma2", "gemma3_text", *MOE_KINDS):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.uniform_(-0.5, 0.5) if kind.startswith("gemma") else param.uniform_(0.5, 1.5)
                if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                    param.normal_(0.0, 0.5)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    shard = "40KB" if kind == "llama" else "50GB"
    model.save_pretrained(path, max_shard_size=shard)
    return path


# MoE families stay out of this fixture's backend grid (CI time): their experts do not touch
# attention, and test_model_families checks them against HF and PEFT (one and two shards).
@pytest.fixture(scope="session", params=sorted(set(TINY_CONFIGS) - set(MOE_KINDS)))
def tiny_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    kind = request.param
    return kind, build_tiny_model(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama-behaviour"))


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    """A real OTLP/HTTP endpoint for a module's server (--otlp-endpoint otlp.url)."""
    receiver = OtlpReceiver()
    yield receiver
    receiver.server.shutdown()


def served_tiny_llama_with_adapters(
    tmp_path_factory: pytest.TempPathFactory, name: str, adapters: Mapping[str, tuple[str, ...]], seed: int
) -> Path:
    """The tiny Llama as a server serves it (tiny_served.py) and, in `adapters/` beside it, one random
    PEFT LoRA adapter (rank 4, alpha 8) per name on the projections given, drawn from seed, seed+1, ..."""
    from peft import LoraConfig, get_peft_model
    from tiny_served import build_served_tiny_llama  # it imports this module
    from transformers import AutoModelForCausalLM

    path = build_served_tiny_llama(tmp_path_factory.mktemp(f"{name}-llama"))
    for i, (adapter, targets) in enumerate(adapters.items()):
        torch.manual_seed(seed + i)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(path.parent / "adapters" / adapter)
    return path


@contextmanager
def tiny_llama_server(
    model: Path, tmp_path_factory: pytest.TempPathFactory, name: str, *args: str
) -> Iterator[Launcher]:
    """A launcher serving a `served_tiny_llama_with_adapters` model, its adapters local, with `args`."""
    adapters = ("--adapter-source", "local", "--adapter-root", str(model.parent / "adapters"))
    with launcher(model, tmp_path_factory.mktemp(f"{name}-launcher"), *adapters, *args) as server:
        yield server
