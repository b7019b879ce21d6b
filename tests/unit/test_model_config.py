"""config.json → ModelConfig: each family's switches, and clear refusals for what the worker cannot run."""

from __future__ import annotations

import math

import pytest

from loraxpy.worker.model_config import SUPPORTED_MODEL_TYPES, ModelConfig, ModelConfigError

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, vocab_size=100)


def test_unknown_families_are_refused_with_the_supported_list() -> None:
    with pytest.raises(ModelConfigError) as e:
        ModelConfig.from_dict({**BASE, "model_type": "gpt_neox"})
    assert "gpt_neox" in str(e.value) and all(t in str(e.value) for t in SUPPORTED_MODEL_TYPES)


def test_unknown_activations_are_refused_by_name() -> None:
    with pytest.raises(ModelConfigError, match="relu"):
        ModelConfig.from_dict({**BASE, "model_type": "llama", "hidden_act": "relu"})


def test_gemma2_reads_its_soft_caps_and_alternating_windows() -> None:
    cfg = {**BASE, "model_type": "gemma2", "sliding_window": 8, "query_pre_attn_scalar": 20}
    capped = ModelConfig.from_dict({**cfg, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0})
    assert (capped.attn_softcap, capped.final_softcap) == (50.0, 30.0)
    assert capped.sliding_windows == (8, None, 8, None)  # configs before transformers 5: even layers slide
    assert not capped.qk_norm and capped.sandwich_norms and capped.rope_local is None
    uncapped = ModelConfig.from_dict({**cfg, "attn_logit_softcapping": None, "final_logit_softcapping": None})
    assert (uncapped.attn_softcap, uncapped.final_softcap) == (None, None)


def test_gemma3_before_and_after_transformers_5_read_alike() -> None:
    """Old configs: rope_theta + rope_local_base_freq + sliding_window_pattern; new: per-type rope_parameters."""
    common = {
        **BASE,
        "model_type": "gemma3_text",
        "head_dim": 32,
        "sliding_window": 8,
        "query_pre_attn_scalar": 24,
    }
    old = ModelConfig.from_dict(
        {**common, "rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window_pattern": 2}
    )
    new = ModelConfig.from_dict(
        {
            **common,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        }
    )
    assert old == new
    assert new.sliding_windows == (8, None, 8, None)
    assert (new.rope.theta, new.rope_local.theta if new.rope_local else None) == (1e6, 1e4)
    assert (new.norm_offset, new.sandwich_norms, new.qk_norm, new.hidden_act) == (
        1.0,
        True,
        True,
        "gelu_pytorch_tanh",
    )
    assert new.embed_scale == 64**0.5 and new.attn_scale == 24**-0.5


def test_phi3_partial_rotary_and_longrope() -> None:
    cfg = {
        **BASE,
        "model_type": "phi3",
        "rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.75},
    }
    assert ModelConfig.from_dict(cfg).rotary_dim == 12  # head_dim 16
    assert ModelConfig.from_dict({**BASE, "model_type": "phi3"}).rotary_dim == 0  # all of each head
    longrope = {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    phi = {
        **BASE,
        "model_type": "phi3",
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
    }
    rope = ModelConfig.from_dict({**phi, "rope_scaling": longrope}).rope
    assert (rope.rope_type, rope.original_max_position_embeddings, rope.long_factor) == (
        "longrope",
        4096,
        (2.0,) * 8,
    )
    assert rope.attention_factor == pytest.approx((1 + math.log(32) / math.log(4096)) ** 0.5)  # HF's default
    with pytest.raises(ModelConfigError, match="'yarn' is not supported"):
        ModelConfig.from_dict({**phi, "rope_scaling": {"type": "yarn", "factor": 4.0}})
