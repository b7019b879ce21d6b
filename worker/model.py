"""One Llama-family decoder (llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3; mixtral, qwen2_moe,
qwen3_moe with worker/moe.py's experts) over a paged KV cache; variants are config flags (ModelConfig
names each one)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraxpy.kernels.attention import AttentionBackend, AttentionMetadata
from loraxpy.worker.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RMSNorm,
    RowParallelLinear,
    Shard,
    VocabParallelEmbedding,
    rms_norm,
)
from loraxpy.worker.model_config import ModelConfig
from loraxpy.worker.moe import SparseMoeBlock
from loraxpy.worker.rotary import RotaryEmbedding, apply_rotary

RopeTable = tuple[torch.Tensor, torch.Tensor]  # cos, sin [num_tokens, 1, head_dim] at the step's positions


@dataclass
class ForwardBatch:
    """Everything one forward pass needs besides the weights; built by the runner each step."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64: where each token's K/V goes in the cache
    attn: AttentionMetadata
    kv_caches: list[
        tuple[torch.Tensor, torch.Tensor]
    ]  # per layer: k, v [num_blocks, block_size, kv_heads, head_dim]
    # longrope only: per token, the sequence length HF's forward would see (BatchPlan.rope_lengths)
    rope_lengths: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_index: int,
        shard: Shard,
        attention: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.head_dim = config.head_dim
        self.num_heads = shard.split(config.num_heads, "num_attention_heads")
        self.num_kv_heads = shard.split(config.num_kv_heads, "num_key_value_heads")
        self.scale = config.attn_scale or config.head_dim**-0.5
        self.sliding_window = config.sliding_windows[layer_index]
        # Only soft-capped models pass it: the Triton kernels take no soft-cap (such models run SDPA).
        self.softcap = {"softcap": config.attn_softcap} if config.attn_softcap else {}
        self.attention = attention
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size,
            {"q_proj": config.q_size, "k_proj": config.kv_size, "v_proj": config.kv_size},
            bias=config.qkv_bias,
            shard=shard,
            dtype=dtype,
            device=device,
        )
        self.o_proj = RowParallelLinear(
            config.q_size, config.hidden_size, bias=config.o_bias, shard=shard, dtype=dtype, device=device
        )
        if config.qk_norm:
            eps, offset = config.rms_norm_eps, config.norm_offset
            self.q_norm = RMSNorm(config.head_dim, eps, dtype=dtype, device=device, offset=offset)
            self.k_norm = RMSNorm(config.head_dim, eps, dtype=dtype, device=device, offset=offset)
        self.qk_norm = config.qk_norm

    def forward(self, x: torch.Tensor, batch: ForwardBatch, rope: RopeTable) -> torch.Tensor:
        # x: [num_tokens, hidden]
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # q and k sit side by side in qkv's rows: one rotary pass covers both.
        qk = qkv[:, : q_size + kv_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.qk_norm:  # one pass over q's and k's heads, each head with its own norm's weight
            weight = torch.cat(
                [
                    self.q_norm.weight.expand(self.num_heads, -1),
                    self.k_norm.weight.expand(self.num_kv_heads, -1),
                ]
            )
            qk = rms_norm(qk, weight, self.q_norm.eps, self.q_norm.offset)
        q, k = apply_rotary(qk, rope).split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, q_size + kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = batch.kv_caches[self.layer_index]
        self.attention.store(k, v, k_cache, v_cache, batch.slot_mapping)
        out = self.attention.attend(
            q, k_cache, v_cache, batch.attn, self.scale, self.sliding_window, **self.softcap
        )
        return self.o_proj(out.reshape(-1, q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(
            config.hidden_size,
            {"gate_proj": size, "up_proj": size},
            bias=config.mlp_bias,
            shard=shard,
            dtype=dtype,
            device=device,
        )
        self.down_proj = RowParallelLinear(
            size, config.hidden_size, bias=config.mlp_bias, shard=shard, dtype=dtype, device=device
        )
        self.gelu = config.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * up)


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_index: int,
        shard: Shard,
        attention: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()

        def norm() -> RMSNorm:
            return RMSNorm(
                config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device, offset=config.norm_offset
            )

        self.input_layernorm = norm()
        self.self_attn = Attention(config, layer_index, shard, attention, dtype, device)
        # Llama: the norm before the MLP. Gemma: the norm of attention's output, before the residual.
        self.post_attention_layernorm = norm()
        self.mlp: nn.Module = (
            SparseMoeBlock(config, shard, dtype, device)
            if config.is_sparse(layer_index)
            else MLP(config, shard, dtype, device)
        )
        self.sandwich = config.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.local_rope = config.rope_local is not None and config.sliding_windows[layer_index] is not None

    def forward(self, h: torch.Tensor, batch: ForwardBatch, rope: RopeTable) -> torch.Tensor:
        if self.sandwich:
            h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), batch, rope))
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        h = h + self.self_attn(self.input_layernorm(h), batch, rope)
        return h + self.mlp(self.post_attention_layernorm(h))


class CausalLM(nn.Module):
    """Embedding → decoder layers → norm; `compute_logits` applies the LM head to chosen rows only."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        shard: Shard,
        attention: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, shard=shard, dtype=dtype, device=device
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, shard, attention, dtype, device) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device, offset=config.norm_offset
        )
        rotary_dim = config.rotary_dim or config.head_dim
        self.rotary = RotaryEmbedding(config.rope, rotary_dim, config.max_position_embeddings, device)
        self.rotary_local = (
            RotaryEmbedding(config.rope_local, config.head_dim, config.max_position_embeddings, device)
            if config.rope_local is not None
            else None
        )
        # A tied head is built on the meta device (no memory) and then shares the embedding's weight.
        tied = config.tie_word_embeddings
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            shard=shard,
            dtype=dtype,
            device=torch.device("meta") if tied else device,
        )
        if tied:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        # returns hidden states [num_tokens, hidden] after the final norm
        h = self.embed_tokens(batch.input_ids)
        if self.config.embed_scale is not None:  # HF rounds the scale to the weights' dtype first
            h = h * torch.tensor(self.config.embed_scale, dtype=h.dtype)
        rope = self.rotary.at(batch.positions, h.dtype, batch.rope_lengths)
        local = self.rotary_local.at(batch.positions, h.dtype) if self.rotary_local is not None else rope
        for layer in self.layers:
            h = layer(h, batch, local if layer.local_rope else rope)
        return self.norm(h)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        # hidden: [n, hidden] -> [n, vocab_size] fp32; rows: their indices in the batch (for LoRA)
        logits = self.lm_head.logits(hidden, rows)
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
