"""Llama-shaped models and PEFT adapters with random weights, written to disk as HF folders.

The benchmark needs no download: it writes a config.json and random safetensors for a named shape
(the "1b" and "8b" shapes of Llama 3, or a tiny one for CPU), and PEFT adapter folders of any rank
on all seven projections. Both the worker and HF transformers + PEFT load exactly these files, so
the engine and its baseline run the same weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

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


SHAPES = {
    "tiny": ModelShape("tiny", 64, 2, 4, 2, 128, 320, max_position_embeddings=4096),
    "1b": ModelShape("1b", 2048, 16, 32, 8, 8192, 128256),
    "8b": ModelShape("8b", 4096, 32, 32, 8, 14336, 128256),
}


def _randn(shape: tuple[int, ...], std: float, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    device = gen.device
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype).cpu()


def write_random_model(
    shape: ModelShape, path: Path, dtype: torch.dtype, seed: int = 0, device: torch.device | None = None
) -> Path:
    """An HF Llama folder with random weights, one safetensors shard per layer (bounded host memory).

    `device` only draws the random numbers (a GPU draws 8B of them in seconds); files hold `dtype`.
    """
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


def write_random_adapter(shape: ModelShape, path: Path, rank: int, dtype: torch.dtype, seed: int) -> Path:
    """A PEFT LoRA folder: rank `rank` on all seven projections of every layer, lora_alpha = rank.

    A ~ N(0, 1/in) keeps the shrink output O(1); B ~ N(0, WEIGHT_STD) makes the delta comparable to
    a random base projection, so an adapter visibly changes greedy tokens (the tests rely on it).
    """
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(shape.num_layers):
        for target, (fan_in, fan_out) in shape.module_shapes().items():
            block = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
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
        "target_modules": list(TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return path


def adapter_bytes(shape: ModelShape, rank: int, element_size: int) -> int:
    """Bytes of one adapter of rank `rank` on all seven projections: r · Σ(in + out) per layer."""
    per_layer = sum(fan_in + fan_out for fan_in, fan_out in shape.module_shapes().values())
    return rank * per_layer * shape.num_layers * element_size
