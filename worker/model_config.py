"""The model's architecture, read once from config.json into a validated, frozen dataclass."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraxpy.proto.model_task import ENCODER_MODEL_TYPES

SUPPORTED_MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe", "qwen3_moe",
)  # fmt: skip
QWEN_TYPES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
GEMMA_TYPES = ("gemma2", "gemma3_text")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


class ModelConfigError(ValueError):
    """config.json describes a model this worker cannot run; the message says why."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # longrope only (Phi-3): per-frequency divisors for sequences within / beyond the original length,
    # and the factor cos and sin are scaled by.
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0


@dataclass(frozen=True)
class MoeConfig:
    """A mixture-of-experts MLP (worker/moe.py): each token runs its top_k experts of num_experts."""

    num_experts: int
    top_k: int
    expert_size: int  # each expert's intermediate size
    # Whether the top-k routing weights are renormalised to sum to 1 (Mixtral always; Qwen: norm_topk_prob).
    renormalize: bool
    # Qwen2-MoE: a dense expert every token runs, scaled by sigmoid(shared_expert_gate(x)); 0: none.
    shared_expert_size: int = 0
    # One entry per layer: True where the layer's MLP is the experts, False for a dense MLP.
    sparse_layers: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ModelConfigError(
                f"num_experts_per_tok ({self.top_k}) must be between 1 and the number of experts ({self.num_experts})"
            )


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # qwen3, gemma3: RMSNorm over each head of q and k, before RoPE
    hidden_act: str = "silu"  # of the MLP's gate: silu, or gelu_pytorch_tanh (Gemma's GeGLU)
    # Gemma: norms scale by (offset + w), a norm before and after both attention and the MLP
    # ("sandwich"), embeddings scaled by sqrt(hidden), q.k scaled by query_pre_attn_scalar^-0.5 instead
    # of head_dim^-0.5, and sliding-window layers with a RoPE of their own (`rope_local`).
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    embed_scale: float | None = None
    attn_scale: float | None = None
    rope_local: RopeConfig | None = None
    # Gemma 2: attention scores and final logits soft-capped as cap * tanh(x / cap).
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # Phi-4-mini: RoPE turns only the first rotary_dim dims of each head (partial_rotary_factor); 0: all.
    rotary_dim: int = 0
    # One entry per layer: the sliding window in tokens, or None for full attention.
    sliding_windows: tuple[int | None, ...] = field(default_factory=tuple)
    eos_token_ids: tuple[int, ...] = ()
    moe: MoeConfig | None = None  # Mixtral, Qwen2-MoE, Qwen3-MoE

    def __post_init__(self) -> None:
        # Encoders (worker/encoder_config.py) build this config themselves; from_dict reads decoders.
        if self.model_type not in SUPPORTED_MODEL_TYPES + ENCODER_MODEL_TYPES:
            raise ModelConfigError(
                f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if len(self.sliding_windows) != self.num_layers:
            raise ModelConfigError("sliding_windows needs one entry per layer")
        if self.moe is not None and len(self.moe.sparse_layers) != self.num_layers:
            raise ModelConfigError("moe.sparse_layers needs one entry per layer")

    @property
    def is_encoder(self) -> bool:
        return self.model_type in ENCODER_MODEL_TYPES

    def is_sparse(self, layer_index: int) -> bool:
        """Whether this layer's MLP is a mixture of experts."""
        return self.moe is not None and self.moe.sparse_layers[layer_index]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        gemma = model_type in GEMMA_TYPES
        default_act = "gelu_pytorch_tanh" if gemma else "silu"  # HF's defaults
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or default_act
        act = "silu" if act == "swish" else act
        if act not in SUPPORTED_ACTIVATIONS:
            raise ModelConfigError(
                f"hidden_act {act!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        num_layers = int(cfg["num_hidden_layers"])
        rope, rope_local = _ropes_from_dict(cfg)
        head_dim = int(cfg.get("head_dim") or hidden // num_heads)
        partial = float(
            (cfg.get("rope_parameters") or {}).get(
                "partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)
            )
        )
        scalar = cfg.get("query_pre_attn_scalar")
        return cls(
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=head_dim,
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=rope,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=_qkv_bias(cfg, model_type),
            o_bias=model_type not in ("qwen2", "qwen2_moe") and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
            hidden_act=act,
            norm_offset=1.0 if gemma else 0.0,
            sandwich_norms=gemma,
            embed_scale=hidden**0.5 if gemma else None,
            attn_scale=float(scalar) ** -0.5 if gemma and scalar else None,
            rope_local=rope_local if gemma else None,
            attn_softcap=_positive_or_none(cfg.get("attn_logit_softcapping")) if gemma else None,
            final_softcap=_positive_or_none(cfg.get("final_logit_softcapping")) if gemma else None,
            rotary_dim=int(head_dim * partial) if partial < 1.0 else 0,
            sliding_windows=_sliding_windows(cfg, model_type, num_layers),
            eos_token_ids=_as_ids(cfg.get("eos_token_id")),
            moe=_moe_from_dict(cfg, model_type, num_layers),
        )

    @classmethod
    def from_folder(cls, path: Path) -> ModelConfig:
        """Reads config.json, and the EOS ids of generation_config.json when it has any."""
        cfg = json.loads((path / "config.json").read_text())
        config = cls.from_dict(cfg)
        gen_path = path / "generation_config.json"
        if gen_path.exists():
            gen_eos = _as_ids(json.loads(gen_path.read_text()).get("eos_token_id"))
            if gen_eos:
                config = _replace_eos(config, gen_eos)
        return config


def _qkv_bias(cfg: dict[str, Any], model_type: str) -> bool:
    if model_type == "qwen2":
        return True
    if model_type == "qwen2_moe":  # HF's Qwen2-MoE: q/k/v biases unless qkv_bias is false
        return bool(cfg.get("qkv_bias", True))
    return bool(cfg.get("attention_bias", False))


def _moe_from_dict(cfg: dict[str, Any], model_type: str, num_layers: int) -> MoeConfig | None:
    """The experts of Mixtral (every layer, always renormalised) and Qwen2/3-MoE (layers chosen by
    mlp_only_layers and decoder_sparse_step, renormalised when norm_topk_prob; Qwen2's shared expert)."""
    if model_type == "mixtral":
        return MoeConfig(
            num_experts=int(cfg.get("num_local_experts", 8)),
            top_k=int(cfg.get("num_experts_per_tok", 2)),
            expert_size=int(cfg["intermediate_size"]),
            renormalize=True,
            sparse_layers=(True,) * num_layers,
        )
    if model_type not in ("qwen2_moe", "qwen3_moe"):
        return None
    # Hub configs write num_experts; transformers 5 saves Qwen3-MoE's as num_local_experts.
    num_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    if num_experts == 0:  # every layer dense
        return None
    dense = {int(i) for i in cfg.get("mlp_only_layers") or ()}
    step = int(cfg.get("decoder_sparse_step", 1))
    sparse = tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))
    return MoeConfig(
        num_experts=num_experts,
        top_k=int(cfg.get("num_experts_per_tok", 1)),
        expert_size=int(cfg["moe_intermediate_size"]),
        renormalize=bool(cfg.get("norm_topk_prob", False)),
        shared_expert_size=int(cfg.get("shared_expert_intermediate_size", 0))
        if model_type == "qwen2_moe"
        else 0,
        sparse_layers=sparse,
    )


def _positive_or_none(value: Any) -> float | None:
    return float(value) if value else None


def _replace_eos(config: ModelConfig, eos: tuple[int, ...]) -> ModelConfig:
    from dataclasses import replace

    return replace(config, eos_token_ids=eos)


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _ropes_from_dict(cfg: dict[str, Any]) -> tuple[RopeConfig, RopeConfig | None]:
    """The RoPE of full-attention layers, and the sliding layers' own where the config has one (Gemma 3:
    `rope_parameters` per layer type in transformers 5, `rope_local_base_freq` before)."""
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params:
        local = params.get("sliding_attention")
        return _rope_from_dict(cfg, params["full_attention"]), _rope_from_dict(cfg, local) if local else None
    rope = _rope_from_dict(cfg, params)
    local_theta = cfg.get("rope_local_base_freq")
    return rope, RopeConfig(theta=float(local_theta)) if local_theta else None


def _rope_from_dict(cfg: dict[str, Any], rope_parameters: dict[str, Any]) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (theta inside); 4.x writes `rope_theta` + `rope_scaling`.
    params = dict(rope_parameters or {})
    scaling = cfg.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(
            f"rope scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    original = int(
        params.get("original_max_position_embeddings")
        or cfg.get("original_max_position_embeddings")
        or cfg.get("max_position_embeddings", 8192)
    )
    longrope: dict[str, Any] = {}
    if rope_type == "longrope":
        # HF: factor defaults to max / original positions; attention_factor to sqrt(1 + ln f / ln original).
        factor = float(params.get("factor") or cfg.get("max_position_embeddings", original) / original)
        attention = params.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        longrope = dict(
            short_factor=tuple(float(f) for f in params["short_factor"]),
            long_factor=tuple(float(f) for f in params["long_factor"]),
            attention_factor=float(attention),
        )
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor") or 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        **longrope,
    )


def _sliding_windows(cfg: dict[str, Any], model_type: str, num_layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if model_type in QWEN_TYPES and not cfg.get("use_sliding_window", False):
        window = None
    if not window:
        return (None,) * num_layers
    layer_types = cfg.get("layer_types")
    if layer_types:
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    pattern = cfg.get("sliding_window_pattern")
    if model_type == "gemma3_text" and pattern:  # configs before transformers 5: every pattern-th is full
        return tuple(None if (i + 1) % int(pattern) == 0 else int(window) for i in range(num_layers))
    if model_type == "gemma2":  # configs before transformers 5: even layers slide, odd ones see all
        return tuple(None if i % 2 else int(window) for i in range(num_layers))
    if model_type == "qwen2_moe":  # HF's rule when the config lists no layer_types
        first = int(cfg.get("max_window_layers", num_layers))
        return tuple(int(window) if (i + 1) % 2 and i < first else None for i in range(num_layers))
    if model_type in ("qwen2", "qwen3"):
        first = int(cfg.get("max_window_layers", num_layers))
        return tuple(int(window) if i >= first else None for i in range(num_layers))
    return (int(window),) * num_layers
