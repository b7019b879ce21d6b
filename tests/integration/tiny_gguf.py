"""A tiny Llama written as a GGUF file the way llama.cpp's converter writes one, by the gguf package.

Its heads and widths split over two shards (the default model's 9 query heads do not): q/k/v and
o in Q4_1 (the default model's type), gate/up in Q4_0, down and the head in Q8_0, so each block type
the worker reads in torch is served sliced. llama.cpp stores q and k with each head's rotary halves
interleaved (its converter's `permute`); readers undo that. The tokenizer is byte-level BPE over the
256 bytes (and unreachable extra tokens up to the tiny Llama's vocabulary) with no merges.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# Which GGML block type each linear is written in.
LINEAR_TYPES = {
    "attn_q": "Q4_1",
    "attn_k": "Q4_1",
    "attn_v": "Q4_1",
    "attn_output": "Q4_1",
    "ffn_gate": "Q4_0",
    "ffn_up": "Q4_0",
    "ffn_down": "Q8_0",
}
HF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
VOCAB = 320  # the tiny Llama's (tests/integration/conftest.py), so its PEFT adapters fit, the head's too


def _tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order, then unreachable extra tokens."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)] + [
        f"<extra_{i}>" for i in range(VOCAB - 256)
    ]


def _interleave_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q and k: within each head, rows i and i + d/2 become 2i and 2i + 1."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path: Path, seed: int = 1234) -> Path:
    """A random 2-layer Llama (64 hidden, 4 heads, 2 KV heads, 128 intermediate) as GGUF."""
    import gguf

    hidden, inter, layers, heads, kv_heads = 64, 128, 2, 4, 2
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.1) -> np.ndarray:
        return (torch.randn(*shape, generator=gen) * scale).numpy()

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(_tokens())
    writer.add_token_types([gguf.TokenType.NORMAL] * VOCAB)
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_tensor("token_embd.weight", rand(VOCAB, hidden, scale=1.0))
    writer.add_tensor("output_norm.weight", (1 + rand(hidden)).astype(np.float32))
    q8 = gguf.GGMLQuantizationType.Q8_0  # an untied head (a tied one repeats the last token)
    writer.add_tensor("output.weight", gguf.quants.quantize(rand(VOCAB, hidden, scale=0.5), q8), raw_dtype=q8)
    shapes = {
        "attn_q": (hidden, hidden),
        "attn_k": (hidden // heads * kv_heads, hidden),
        "attn_v": (hidden // heads * kv_heads, hidden),
        "attn_output": (hidden, hidden),
        "ffn_gate": (inter, hidden),
        "ffn_up": (inter, hidden),
        "ffn_down": (hidden, inter),
    }
    for i in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", (1 + rand(hidden)).astype(np.float32))
        for name, shape in shapes.items():
            w = rand(*shape, scale=0.2)
            if name in ("attn_q", "attn_k"):
                w = _interleave_rotary(w, heads if name == "attn_q" else kv_heads)
            kind = gguf.GGMLQuantizationType[LINEAR_TYPES[name]]
            writer.add_tensor(f"blk.{i}.{name}.weight", gguf.quants.quantize(w, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
