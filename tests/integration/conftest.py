"""Tiny random Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 and 3 / Phi-3 checkpoints written by HF transformers itself (the oracle)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
}


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
    if kind in ("qwen3", "gemma2", "gemma3_text"):  # norms start constant: random ones tell each norm apart
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.uniform_(-0.5, 0.5) if kind.startswith("gemma") else param.uniform_(0.5, 1.5)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    shard = "40KB" if kind == "llama" else "50GB"
    model.save_pretrained(path, max_shard_size=shard)
    return path


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    kind = request.param
    return kind, build_tiny_model(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama-behaviour"))
