"""Models and PEFT adapters with random weights, written to disk as HF folders.

The benchmark needs no download: it writes a config.json and random safetensors for a named shape
(the "1b" and "8b" shapes of Llama 3, a tiny one for CPU, and the other families at a popular size's
widths with fewer layers: "qwen3-8b", "gemma2-9b", "phi3-mini", "mixtral-8x7b", "qwen3-30b-a3b"),
and PEFT adapter folders of any rank on every projection the family takes LoRA on. Both the worker
and HF transformers + PEFT load exactly these files, so the engine and its baseline run the same
weights. Llama shapes are written tensor by tensor here; the other families by HF transformers
itself (`from_config`, its own initialisation and checkpoint names), on the bench's device.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
# Phi-3's checkpoints (and so PEFT's modules) fuse q/k/v and gate/up.
FUSED_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# MoE families: LoRA on attention only (the worker refuses adapters on experts).
MOE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
WEIGHT_STD = 0.02  # Llama's initializer range: keeps bf16 activations finite over 32 layers


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 8192
    model_type: str = "llama"
    explicit_head_dim: int | None = None  # head_dim when it is not hidden / heads (Qwen3, Gemma)
    targets: tuple[str, ...] = TARGETS  # the projections the bench's adapters take
    full_layers: int | None = None  # the published model's depth (num_layers is the bench's)
    # the rest of the family's HF config (experts, windows, soft-caps...), as AutoConfig takes it
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_heads

    @classmethod
    def of_model(cls, model_dir: Path) -> ModelShape:
        """The shape of a Llama-family HF folder, so random adapters can be written for a real model."""
        c = json.loads((model_dir / "config.json").read_text())
        shape = cls(
            name=model_dir.name,
            hidden_size=c["hidden_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"],
            num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            intermediate_size=c["intermediate_size"],
            vocab_size=c["vocab_size"],
            max_position_embeddings=c.get("max_position_embeddings", 8192),
        )
        if c.get("head_dim", shape.head_dim) != shape.head_dim:
            raise ValueError(
                f"{model_dir}: head_dim {c['head_dim']} is not hidden_size / num_attention_heads"
            )
        return shape

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each adapted projection."""
        h, f = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, f),
            "up_proj": (h, f),
            "down_proj": (f, h),
        }

    def adapter_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection the bench's adapters target."""
        m = self.module_shapes()
        fused = {
            "qkv_proj": (self.hidden_size, m["q_proj"][1] + 2 * m["k_proj"][1]),
            "gate_up_proj": (self.hidden_size, 2 * self.intermediate_size),
        }
        return {t: {**m, **fused}[t] for t in self.targets}

    def family_config(self) -> dict[str, Any]:
        """The HF config of a non-Llama family (AutoConfig.for_model's arguments)."""
        return {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            **self.extra,
            "bos_token_id": None,
            "eos_token_id": None,
            "pad_token_id": None,
        }

    def tiny(self) -> ModelShape:
        """The same family and switches at toy widths (2 layers, 4 experts): for CPU tests."""
        experts: dict[str, int] = {k: 4 for k in ("num_local_experts", "num_experts") if k in self.extra}
        sizes: dict[str, int] = {
            k: 32 for k in ("moe_intermediate_size", "shared_expert_intermediate_size") if k in self.extra
        }
        windows = {"sliding_window": 8} if self.extra.get("sliding_window") else {}
        top_k = {"num_experts_per_tok": 2} if "num_experts_per_tok" in self.extra else {}
        mha = self.num_kv_heads == self.num_heads
        return dataclasses.replace(
            self,
            name=f"{self.name}-tiny",
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=4 if mha else 2,
            intermediate_size=96,
            vocab_size=320,
            max_position_embeddings=4096,  # the CPU bench's prefill chunk fits
            explicit_head_dim=32 if self.explicit_head_dim else None,
            extra={**self.extra, **experts, **sizes, **windows, **top_k},
        )

    def hf_config(self, dtype: torch.dtype) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": str(dtype).removeprefix("torch."),
            "bos_token_id": None,
            "eos_token_id": None,
            "pad_token_id": None,
        }


# The other families at their published widths (config.json of the model named), with
# FAMILY_LAYERS layers instead of full_layers so one GPU holds them; a step's time per layer scales.
FAMILY_LAYERS = 4
FAMILY_SHAPES = {
    "qwen3-8b": ModelShape(
        "qwen3-8b", 4096, FAMILY_LAYERS, 32, 8, 12288, 151936, 40960, "qwen3", 128, TARGETS, 36,
        {"rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    ),
    "gemma2-9b": ModelShape(
        "gemma2-9b", 3584, FAMILY_LAYERS, 16, 8, 14336, 256000, 8192, "gemma2", 256, TARGETS, 42,
        {
            "query_pre_attn_scalar": 256,
            "sliding_window": 4096,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "hidden_activation": "gelu_pytorch_tanh",
            "tie_word_embeddings": True,
        },
    ),
    "phi3-mini": ModelShape(
        "phi3-mini", 3072, FAMILY_LAYERS, 32, 32, 8192, 32064, 4096, "phi3", None, FUSED_TARGETS, 32,
        {"sliding_window": 2047, "rope_theta": 10000.0, "tie_word_embeddings": False},
    ),
    "mixtral-8x7b": ModelShape(
        "mixtral-8x7b", 4096, FAMILY_LAYERS, 32, 8, 14336, 32000, 32768, "mixtral", None, MOE_TARGETS, 32,
        {
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "rope_theta": 1_000_000.0,
            "sliding_window": None,
            "tie_word_embeddings": False,
        },
    ),
    "qwen3-30b-a3b": ModelShape(
        "qwen3-30b-a3b", 2048, FAMILY_LAYERS, 32, 4, 6144, 151936, 40960, "qwen3_moe", 128, MOE_TARGETS, 48,
        {
            "moe_intermediate_size": 768,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "norm_topk_prob": True,
            "rope_theta": 1_000_000.0,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
        },
    ),
}  # fmt: skip

SHAPES = {
    "tiny": ModelShape("tiny", 64, 2, 4, 2, 128, 320, max_position_embeddings=4096),
    "1b": ModelShape("1b", 2048, 16, 32, 8, 8192, 128256),
    "8b": ModelShape("8b", 4096, 32, 32, 8, 14336, 128256),
    **FAMILY_SHAPES,
}


def _randn(shape: tuple[int, ...], std: float, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    device = gen.device
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype).cpu()


def write_random_model(
    shape: ModelShape, path: Path, dtype: torch.dtype, seed: int = 0, device: torch.device | None = None
) -> Path:
    """An HF Llama folder with random weights, one safetensors shard per layer (bounded host memory).

    `device` only draws the random numbers (a GPU draws 8B of them in seconds); files hold `dtype`.
    Other families are written by HF transformers (`write_family_model`).
    """
    if shape.model_type != "llama":
        return write_family_model(shape, path, dtype, seed, device)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device or "cpu").manual_seed(seed)
    weight_map: dict[str, str] = {}
    ones = torch.ones(shape.hidden_size, dtype=dtype)
    h, v = shape.hidden_size, shape.vocab_size
    top = {
        "model.embed_tokens.weight": _randn((v, h), WEIGHT_STD, gen, dtype),
        "model.norm.weight": ones,
        "lm_head.weight": _randn((v, h), WEIGHT_STD, gen, dtype),
    }
    shards = [("model-top.safetensors", top)]
    for i in range(shape.num_layers):
        prefix = f"model.layers.{i}"
        tensors = {
            f"{prefix}.input_layernorm.weight": ones.clone(),
            f"{prefix}.post_attention_layernorm.weight": ones.clone(),
        }
        for target, (fan_in, fan_out) in shape.module_shapes().items():
            block = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            tensors[f"{prefix}.{block}.{target}.weight"] = _randn((fan_out, fan_in), WEIGHT_STD, gen, dtype)
        shards.append((f"model-layer-{i:03d}.safetensors", tensors))
    for file_name, tensors in shards:
        save_file(tensors, str(path / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file_name))
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (path / "config.json").write_text(json.dumps(shape.hf_config(dtype), indent=1))
    return path


def write_family_model(
    shape: ModelShape, path: Path, dtype: torch.dtype, seed: int = 0, device: torch.device | None = None
) -> Path:
    """The family's model as HF transformers builds it from its config (its own initialisation, norms
    and checkpoint names), drawn on `device`, saved in `dtype`. Written beside `path` and moved there
    at the end, so a folder at `path` is always complete."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(shape.model_type, **shape.family_config())
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, max_shard_size="4GB")
    del model
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)
    return path


def write_random_adapter(shape: ModelShape, path: Path, rank: int, dtype: torch.dtype, seed: int) -> Path:
    """A PEFT LoRA folder: rank `rank` on every projection of `shape.targets` (all seven for Llama) of
    every layer, lora_alpha = rank.

    A ~ N(0, 1/in) keeps the shrink output O(1); B ~ N(0, WEIGHT_STD) makes the delta comparable to
    a random base projection, so an adapter visibly changes greedy tokens (the tests rely on it).
    """
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(shape.num_layers):
        for target, (fan_in, fan_out) in shape.adapter_shapes().items():
            block = "self_attn" if target in ATTENTION_TARGETS else "mlp"
            key = f"base_model.model.model.layers.{i}.{block}.{target}"
            tensors[f"{key}.lora_A.weight"] = _randn((rank, fan_in), fan_in**-0.5, gen, dtype)
            tensors[f"{key}.lora_B.weight"] = _randn((fan_out, rank), WEIGHT_STD, gen, dtype)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": list(shape.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return path
