"""One Llama-family decoder (llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3; mixtral, qwen2_moe,
qwen3_moe with worker/moe.py's experts) over a paged KV cache; variants are config flags (ModelConfig
names each one)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from loraxpy.kernels.attention import AttentionBackend, AttentionMetadata
from loraxpy.kernels.cpu_fused import FusedOps
from loraxpy.worker.gguf_weights import GgufLinear
from loraxpy.worker.gptq import PackedLinear
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
        if self.fused is not None:
            return self._fused_forward(qkv, batch, rope, self.fused)
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

    # CPU fused ops (kernels/cpu_fused.py), set by CausalLM.use_fused_ops where they apply: no q/k
    # norms and no soft-capping (those layers keep the torch path).
    fused: FusedOps | None = None

    def _fused_forward(
        self, qkv: torch.Tensor, batch: ForwardBatch, rope: RopeTable, ops: FusedOps
    ) -> torch.Tensor:
        """The torch path's result: rotary and the K/V store in one call, and one decode-attention
        call over the paged cache for decode-only steps (other steps attend through the backend)."""
        k_cache, v_cache = batch.kv_caches[self.layer_index]
        cos, sin = rope
        ops.rotary_store(
            qkv,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            cos,
            sin,
            k_cache,
            v_cache,
            batch.slot_mapping,
        )
        q_size, meta = self.num_heads * self.head_dim, batch.attn
        if meta.max_query_len == 1:
            window = self.sliding_window if self.sliding_window is not None else 0
            out = ops.decode_attention(
                qkv[:, :q_size],
                k_cache,
                v_cache,
                meta.block_tables,
                meta.seq_lens,
                self.num_heads,
                self.scale,
                window,
            )
        else:
            q = qkv[:, :q_size].view(-1, self.num_heads, self.head_dim)
            out = self.attention.attend(q, k_cache, v_cache, meta, self.scale, self.sliding_window)
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

    fused: FusedOps | None = None  # CPU: silu(gate) * up in one call (not for GeGLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.down_proj(self.fused.silu_and_mul(self.gate_up_proj(x)))
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

    def fused_forward(
        self, h: torch.Tensor, delta: torch.Tensor | None, batch: ForwardBatch, rope: RopeTable, ops: FusedOps
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` with each residual add fused into the norm after it: h is the residual stream,
        updated in place; returns it and the MLP's output, which the next norm adds (not sandwich)."""
        norm = self.input_layernorm
        x = ops.add_rms_norm(h, delta, norm.weight, norm.eps, norm.offset)
        attended = self.self_attn(x, batch, rope)
        norm = self.post_attention_layernorm
        x = ops.add_rms_norm(h, attended, norm.weight, norm.eps, norm.offset)
        return h, self.mlp(x)


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
        if self.fused is not None:  # h is this forward's own tensor: the fused norms update it in place
            delta: torch.Tensor | None = None
            for fused_layer in cast(list[DecoderLayer], self.layers):
                h, delta = fused_layer.fused_forward(
                    h, delta, batch, local if fused_layer.local_rope else rope, self.fused
                )
            return self.fused.add_rms_norm(h, delta, self.norm.weight, self.norm.eps, self.norm.offset)
        for layer in self.layers:
            h = layer(h, batch, local if layer.local_rope else rope)
        return self.norm(h)

    fused: FusedOps | None = None

    def use_fused_ops(self, ops: FusedOps) -> str:
        """Switches the CPU layers to the fused ops (kernels/cpu_fused.py) where they apply; returns
        "fused", or "" when this model keeps the torch path."""
        config = self.config
        if self.embed_tokens.weight.device.type != "cpu":
            return ""
        for module in self.modules():  # 4-bit base linears, in any family (kernels/cpu_int4.cpp)
            quant = getattr(module, "quant", None)
            if isinstance(quant, PackedLinear | GgufLinear) and quant.can_use_cpu_kernel:
                quant.cpu_kernel = ops
        if config.sandwich_norms or config.qk_norm or config.attn_softcap is not None:
            return ""  # Gemma's norm placement, q/k norms, soft-capping: the torch path
        self.fused = ops
        for layer in self.layers:
            assert isinstance(layer, DecoderLayer)
            attention = layer.self_attn
            width = (attention.num_heads + 2 * attention.num_kv_heads) * attention.head_dim
            if attention.attention.name == "sdpa" and attention.qkv_proj.out_features == width:
                attention.fused = ops
            if isinstance(layer.mlp, MLP) and not layer.mlp.gelu:
                layer.mlp.fused = ops
        return "fused"

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        # hidden: [n, hidden] -> [n, vocab_size] fp32; rows: their indices in the batch (for LoRA)
        logits = self.lm_head.logits(hidden, rows)
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
