"""Rotary position embeddings (RoPE) with the scaling variants Llama-family configs ask for."""

from __future__ import annotations

import math

import torch
from torch import nn

from loraxpy.worker.model_config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int, *, long: bool = False) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/d), then rescaled as the rope type says; fp32 [head_dim / 2].

    longrope divides each frequency's wavelength by its own factor: the short ones, or with `long`
    the long ones (for sequences beyond the original context).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if rope.rope_type == "longrope":
        factors = torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32)
        return 1.0 / (factors * rope.theta**exponents)
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scaling(inv_freq, rope)
    return inv_freq


def _llama3_scaling(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between blended.
    low_freq_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_freq_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k at given positions, from a cos/sin table built once (rotate-half layout)."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int, device: torch.device) -> None:
        super().__init__()
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.long_cos: torch.Tensor
        self.long_sin: torch.Tensor
        cos, sin = _table(inverse_frequencies(rope, head_dim), max_positions, rope.attention_factor, device)
        self.register_buffer("cos", cos, persistent=False)  # [max_positions, head_dim] fp32
        self.register_buffer("sin", sin, persistent=False)
        # longrope: a second table for sequences longer than the original context.
        self.long_from = rope.original_max_position_embeddings if rope.rope_type == "longrope" else None
        if self.long_from is not None:
            long_cos, long_sin = _table(
                inverse_frequencies(rope, head_dim, long=True), max_positions, rope.attention_factor, device
            )
            self.register_buffer("long_cos", long_cos, persistent=False)
            self.register_buffer("long_sin", long_sin, persistent=False)

    def at(
        self, positions: torch.Tensor, dtype: torch.dtype, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [num_tokens, 1, head_dim] at `positions`: gathered once per step, used by every layer.

        longrope: a token whose `lengths` (the sequence length HF's forward would see for it) exceeds
        the original context takes the long table.
        """
        cos, sin = self.cos[positions], self.sin[positions]
        if self.long_from is not None and lengths is not None:
            long = (lengths > self.long_from)[:, None]
            cos = torch.where(long, self.long_cos[positions], cos)
            sin = torch.where(long, self.long_sin[positions], sin)
        return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [num_tokens]; q: [num_tokens, num_heads, head_dim]; k: [num_tokens, num_kv_heads, head_dim]
        cos_sin = self.at(positions, q.dtype)
        return apply_rotary(q, cos_sin), apply_rotary(k, cos_sin)


def _table(
    inv_freq: torch.Tensor, max_positions: int, scale: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_positions, head_dim] of every position, computed on `device` as HF does."""
    positions = torch.arange(max_positions, dtype=torch.int64, device=device).float()
    freqs = positions[:, None] * inv_freq.to(device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    if scale == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * scale, emb.sin() * scale


def apply_rotary(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin; x: [num_tokens, heads, head_dim] (q and k heads may share a call).

    A table narrower than the heads (partial rotary) turns only their first dims; the rest pass through.
    """
    cos, sin = cos_sin
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        turned = x[..., :rotary_dim]
        return torch.cat((turned * cos + _rotate_half(turned) * sin, x[..., rotary_dim:]), dim=-1)
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
