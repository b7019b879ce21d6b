"""Tiny GPTQ and AWQ checkpoints written from a full-precision one, and the reference weights they stand
for, read back independently of the server's code.

The integers are packed and unpacked by the compressed-tensors package (`pack_to_int32` /
`unpack_from_int32`: value i of a word at bits 4i..4i+3, stored as value + 8), laid out as each format
documents it:

- GPTQ (AutoGPTQ's `QuantLinear.pack`, optimum, GPTQModel): `qweight` int32 [in / 8, out], eight
  consecutive input rows a word; `qzeros` int32 [groups, out / 8], eight consecutive output columns a
  word, each zero point stored minus 1 (checkpoint_format "gptq"); `scales` fp16 [groups, out];
  `g_idx` int32 [in]. With desc_act the rows are quantized in another order (here a seeded
  permutation stands for GPTQ's order of decreasing Hessian diagonal): row perm[j] is in group j // g.
- AWQ (AutoAWQ's `WQLinear_GEMM.from_linear`): `qweight` int32 [in, out / 8] and `qzeros` int32
  [groups, out / 8], both eight output columns a word with column AWQ_ORDER[i] in value i; zero
  points as they are; `scales` fp16 [groups, out]; groups are runs of group_size input rows.

Weights are rounded to the nearest level (asymmetric, min/max per group), which is what GPTQ / AWQ
would produce with no calibration data; the serving side only ever sees the stored tensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
MAXQ = 15  # 4 bits


def _round_to_nearest(w_t: torch.Tensor, g_idx: torch.Tensor, groups: int) -> tuple[torch.Tensor, ...]:
    """W^T [in, out] → unsigned q [in, out], fp16 scales and integer zeros [groups, out]."""
    scales = torch.empty(groups, w_t.shape[1])
    zeros = torch.empty(groups, w_t.shape[1])
    for g in range(groups):
        rows = w_t[g_idx == g]
        lo, hi = rows.min(0).values.clamp(max=0), rows.max(0).values.clamp(min=0)
        scale = ((hi - lo) / MAXQ).clamp(min=1e-8).half().float()
        scales[g] = scale
        zeros[g] = torch.round(-lo / scale).clamp(0, MAXQ)
    q = torch.round(w_t / scales[g_idx] + zeros[g_idx]).clamp(0, MAXQ)
    return q.to(torch.int32), scales.half(), zeros.to(torch.int32)


def _pack(unsigned: torch.Tensor, dim: int) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32((unsigned - 8).to(torch.int8), 4, packed_dim=dim)


def _unpack(packed: torch.Tensor, shape: tuple[int, int], dim: int) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(packed, 4, torch.Size(shape), packed_dim=dim).to(torch.int32) + 8


def _awq_columns(t: torch.Tensor) -> torch.Tensor:
    """Columns reordered so that value i of each word holds column AWQ_ORDER[i] of its eight."""
    order = torch.tensor(AWQ_ORDER)
    index = (torch.arange(t.shape[1]).view(-1, 8)[:, order]).reshape(-1)
    return t[:, index]


def _awq_columns_back(t: torch.Tensor) -> torch.Tensor:
    order = torch.tensor(AWQ_ORDER)
    index = (torch.arange(t.shape[1]).view(-1, 8)[:, order]).reshape(-1)
    out = torch.empty_like(t)
    out[:, index] = t
    return out


def write_checkpoint(base: Path, dest: Path, method: str, group_size: int, desc_act: bool = False) -> Path:
    """`base`'s decoder linears quantized and packed as `method` (gptq | awq) into `dest`, with the
    quantization_config transformers writes for it; everything else as in `base`."""
    dest.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(base.glob("*.safetensors")):
        tensors.update(load_file(f))
    gen = torch.Generator().manual_seed(7)
    out: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        module, _, param = name.rpartition(".")
        if param != "weight" or module.rpartition(".")[2] not in LINEARS:
            out[name] = w
            continue
        w_t = w.float().t().contiguous()  # [in, out]
        in_features = w_t.shape[0]
        groups = -(-in_features // group_size)  # the last group may be shorter
        if desc_act:
            perm = torch.randperm(in_features, generator=gen)
            g_idx = torch.empty(in_features, dtype=torch.int32)
            g_idx[perm] = (torch.arange(in_features) // group_size).to(torch.int32)
        else:
            g_idx = (torch.arange(in_features) // group_size).to(torch.int32)
        q, scales, zeros = _round_to_nearest(w_t, g_idx, groups)
        if method == "gptq":
            out[f"{module}.qweight"] = _pack(q, 0)
            out[f"{module}.qzeros"] = _pack(zeros - 1, 1)  # v1: zero point minus 1
            out[f"{module}.g_idx"] = g_idx
        else:
            out[f"{module}.qweight"] = _pack(_awq_columns(q), 1)
            out[f"{module}.qzeros"] = _pack(_awq_columns(zeros), 1)
        out[f"{module}.scales"] = scales
    save_file(out, str(dest / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    if method == "gptq":
        config["quantization_config"] = {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group_size,
            "desc_act": desc_act,
            "sym": False,
            "checkpoint_format": "gptq",
        }
    else:
        config["quantization_config"] = {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group_size,
            "zero_point": True,
            "version": "gemm",
        }
    (dest / "config.json").write_text(json.dumps(config))
    for f in base.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, dest / f.name)
    return dest


def reference_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Module name → the fp32 weight W [out, in] its packed tensors stand for:
    W^T[i, o] = (q[i, o] - z[g(i), o]) * s[g(i), o]."""
    tensors = load_file(str(checkpoint / "model.safetensors"))
    q_config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    group_size = q_config["group_size"]
    weights = {}
    for name in tensors:
        if not name.endswith(".qweight"):
            continue
        module = name.removesuffix(".qweight")
        scales = tensors[f"{module}.scales"].float()
        groups, out_features = scales.shape
        if q_config["quant_method"] == "gptq":
            qweight = tensors[name]
            in_features = qweight.shape[0] * 8
            q = _unpack(qweight, (in_features, out_features), 0)
            zeros = _unpack(tensors[f"{module}.qzeros"], (groups, out_features), 1) + 1
            g_idx = tensors[f"{module}.g_idx"].long()
        else:
            qweight = tensors[name]
            in_features = qweight.shape[0]
            q = _awq_columns_back(_unpack(qweight, (in_features, out_features), 1))
            zeros = _awq_columns_back(_unpack(tensors[f"{module}.qzeros"], (groups, out_features), 1))
            g_idx = torch.arange(in_features) // group_size
        w_t = (q - zeros[g_idx]).float() * scales[g_idx]
        weights[module] = w_t.t().contiguous()
    return weights


def write_fp8_checkpoint(base: Path, dest: Path, preset: str) -> Path:
    """`base`'s decoder linears as a compressed-tensors FP8 checkpoint of LLM Compressor's `preset`
    scheme (FP8: a weight scale and a static input scale per tensor; FP8_DYNAMIC: a weight scale per
    output channel, activations scaled at run time): e4m3 weights = W / scale with scale = max|W| / 448
    over the tensor or the channel, stored as `weight` and `weight_scale` (`input_scale` for static
    activations), the quantization_config as compressed-tensors' own QuantizationConfig writes it."""
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    scheme = preset_name_to_scheme(preset, ["Linear"])
    per_channel = scheme.weights.strategy == "channel"
    dest.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(base.glob("*.safetensors")):
        tensors.update(load_file(f))
    out: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        module, _, param = name.rpartition(".")
        if param != "weight" or module.rpartition(".")[2] not in LINEARS:
            out[name] = w
            continue
        absmax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1)
        scale = absmax.float() / 448.0
        out[name] = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        out[f"{module}.weight_scale"] = scale
        if scheme.input_activations is not None and not scheme.input_activations.dynamic:
            out[f"{module}.input_scale"] = torch.ones(1)
    save_file(out, str(dest / "model.safetensors"), metadata={"format": "pt"})
    q_config = QuantizationConfig(
        config_groups={"group_0": scheme},
        format="float-quantized",
        quantization_status="compressed",
        ignore=["lm_head"],
    )
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        **json.loads(q_config.model_dump_json()),
    }
    (dest / "config.json").write_text(json.dumps(config))
    for f in base.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, dest / f.name)
    return dest
