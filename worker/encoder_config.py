"""BERT-family encoders (BERT, DistilBERT, XLM-RoBERTa): their config.json read once, and how their
checkpoint modules are named, for the weights (worker/encoder.py) and for PEFT adapters
(worker/adapters.py) alike.

Inside the worker an encoder layer has the decoder's LoRA-carrying linears: `self_attn.qkv_proj`
(q_proj, k_proj, v_proj), `self_attn.o_proj`, `mlp.up_proj` and `mlp.down_proj` (no gate). Each
checkpoint module maps onto one of those slices, so an adapter on BERT's `query` is a q_proj
adapter to the LoRA slots, and `module_shape` / `ModelConfig` describe encoders as they do decoders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraxpy.proto.model_task import ENCODER_MODEL_TYPES, ModelTask
from loraxpy.worker.model_config import ModelConfig, ModelConfigError, RopeConfig

# checkpoint module (after `encoder.layer.<i>.` / `transformer.layer.<i>.`) → (our module, slice)
BERT_LAYER = {
    "attention.self.query": ("self_attn.qkv_proj", "q_proj"),
    "attention.self.key": ("self_attn.qkv_proj", "k_proj"),
    "attention.self.value": ("self_attn.qkv_proj", "v_proj"),
    "attention.output.dense": ("self_attn.o_proj", "o_proj"),
    "attention.output.LayerNorm": ("attn_norm", "norm"),
    "intermediate.dense": ("mlp.up_proj", "up_proj"),
    "output.dense": ("mlp.down_proj", "down_proj"),
    "output.LayerNorm": ("mlp_norm", "norm"),
}
DISTILBERT_LAYER = {
    "attention.q_lin": ("self_attn.qkv_proj", "q_proj"),
    "attention.k_lin": ("self_attn.qkv_proj", "k_proj"),
    "attention.v_lin": ("self_attn.qkv_proj", "v_proj"),
    "attention.out_lin": ("self_attn.o_proj", "o_proj"),
    "sa_layer_norm": ("attn_norm", "norm"),
    "ffn.lin1": ("mlp.up_proj", "up_proj"),
    "ffn.lin2": ("mlp.down_proj", "down_proj"),
    "output_layer_norm": ("mlp_norm", "norm"),
}
# checkpoint module → our module, for the embeddings
BERT_EMBEDDINGS = {
    "embeddings.word_embeddings": "embeddings.word",
    "embeddings.position_embeddings": "embeddings.position",
    "embeddings.token_type_embeddings": "embeddings.token_type",
    "embeddings.LayerNorm": "embeddings.norm",
}
DISTILBERT_EMBEDDINGS = {k: v for k, v in BERT_EMBEDDINGS.items() if "token_type" not in k}
# The base model's prefix inside a checkpoint with a head (BertForTokenClassification: `bert.`).
BASE_PREFIXES = ("bert.", "roberta.", "distilbert.")
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


@dataclass(frozen=True)
class EncoderConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    max_position_embeddings: int  # rows of the position table
    type_vocab_size: int  # 0: no token-type embeddings (DistilBERT)
    layer_norm_eps: float
    activation: str  # gelu (erf), gelu_tanh or relu
    pad_token_id: int
    task: ModelTask

    @property
    def distil(self) -> bool:
        return self.model_type == "distilbert"

    @property
    def layer_names(self) -> dict[str, tuple[str, str]]:
        return DISTILBERT_LAYER if self.distil else BERT_LAYER

    @property
    def layer_prefix(self) -> str:
        return "transformer.layer" if self.distil else "encoder.layer"

    @property
    def position_offset(self) -> int:
        """XLM-RoBERTa numbers positions after its padding id (HF: cumsum of non-pad tokens + pad id)."""
        return self.pad_token_id + 1 if self.model_type == "xlm-roberta" else 0

    @property
    def max_tokens(self) -> int:
        """The longest input the position table covers."""
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> EncoderConfig:
        model_type = cfg.get("model_type", "")
        if model_type not in ENCODER_MODEL_TYPES:
            raise ModelConfigError(f"model_type {model_type!r} is not an encoder of the BERT family")
        distil = model_type == "distilbert"
        act = str(cfg.get("activation" if distil else "hidden_act", "gelu"))
        if act not in ACTIVATIONS:
            raise ModelConfigError(
                f"activation {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
            )
        if not distil and cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ModelConfigError("only absolute position embeddings are supported")
        # DistilBERT's sinusoidal_pos_embds: HF saves the table in position_embeddings.weight too.
        return cls(
            model_type=model_type,
            hidden_size=int(cfg["dim" if distil else "hidden_size"]),
            intermediate_size=int(cfg["hidden_dim" if distil else "intermediate_size"]),
            num_layers=int(cfg["n_layers" if distil else "num_hidden_layers"]),
            num_heads=int(cfg["n_heads" if distil else "num_attention_heads"]),
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 512)),
            type_vocab_size=0 if distil else int(cfg.get("type_vocab_size", 2)),
            layer_norm_eps=1e-12 if distil else float(cfg.get("layer_norm_eps", 1e-12)),
            activation=ACTIVATIONS[act],
            pad_token_id=int(cfg.get("pad_token_id") or 0),
            task=ModelTask.from_config(cfg),
        )

    @classmethod
    def from_folder(cls, path: Path) -> EncoderConfig:
        return cls.from_dict(json.loads((path / "config.json").read_text()))

    def model_config(self) -> ModelConfig:
        """The same model as the LoRA slots, adapters and Info see it (decoder fields unused)."""
        head_dim = self.hidden_size // self.num_heads
        return ModelConfig(
            model_type=self.model_type,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_heads,
            head_dim=head_dim,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_tokens,
            rms_norm_eps=self.layer_norm_eps,
            rope=RopeConfig(theta=10000.0),
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            sliding_windows=(None,) * self.num_layers,
        )


def encoder_module_name(config: ModelConfig, layer: int, target: str) -> str:
    """An adapted module's name in the HF model (as PEFT's alpha_pattern sees it), from our slice name."""
    names = DISTILBERT_LAYER if config.model_type == "distilbert" else BERT_LAYER
    prefix = "transformer.layer" if config.model_type == "distilbert" else "encoder.layer"
    module = next(hf for hf, (_, slice_name) in names.items() if slice_name == target)
    return f"{prefix}.{layer}.{module}"


def encoder_target(config: ModelConfig, module: str) -> str | None:
    """Our slice name (q_proj, …, down_proj) of a checkpoint module name of this family, or None."""
    names = DISTILBERT_LAYER if config.model_type == "distilbert" else BERT_LAYER
    entry = names.get(module)
    return None if entry is None or entry[1] == "norm" else entry[1]
