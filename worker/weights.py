"""Streams a safetensors checkpoint (single file or sharded index) into a model, one tensor at a time.

Parameters are allocated once on the target device; each checkpoint tensor is read memory-mapped
and copied into the slice its layer owns, so the weights are never held twice.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from torch import nn

from loraxpy.worker.moe import MIXTRAL_EXPERT_NAMES

logger = logging.getLogger(__name__)

# Checkpoint module name → (fused module in our model, slice name inside it).
FUSED = {
    "q_proj": ("qkv_proj", "q_proj"),
    "k_proj": ("qkv_proj", "k_proj"),
    "v_proj": ("qkv_proj", "v_proj"),
    "gate_proj": ("gate_up_proj", "gate_proj"),
    "up_proj": ("gate_up_proj", "up_proj"),
}


# layers.<i>.(mlp | block_sparse_moe).experts.<e>.<projection>
_EXPERT = re.compile(r"layers\.(\d+)\.(mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)")


class QuantizedTensors(Protocol):
    """Takes a checkpoint's quantized tensors (worker/gptq.py's packed integers, FP8 scales) when
    it is read as stored; `params`: the tensor names it takes in place of the layers' own `load`."""

    params: tuple[str, ...]

    def add(
        self, module_name: str, module: nn.Module, slice_name: str, param: str, tensor: torch.Tensor
    ) -> None: ...


class WeightsError(ValueError):
    """The checkpoint does not fit the model; the message names the tensor."""


def checkpoint_files(model_path: Path) -> list[Path]:
    index = model_path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_path / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no *.safetensors weights in {model_path}")
    return files


def iter_checkpoint(model_path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in checkpoint_files(model_path):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)


def _target(name: str) -> tuple[str, str, str] | None:
    """Maps a checkpoint tensor name to (module path, slice name, param), or None to skip it."""
    if "rotary_emb" in name:
        return None
    name = name.removeprefix("model.")
    module, _, param = name.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    expert = _EXPERT.fullmatch(module)
    if expert is not None:  # one expert's projection: a slice of the layer's stacked experts
        proj = MIXTRAL_EXPERT_NAMES.get(expert[4], expert[4])
        return f"layers.{expert[1]}.mlp.experts", f"{expert[3]}.{proj}", param
    if ".block_sparse_moe." in module:  # Mixtral's router
        return module.replace(".block_sparse_moe.", ".mlp."), leaf, param
    if leaf in FUSED:
        fused, slice_name = FUSED[leaf]
        return f"{parent}.{fused}", slice_name, param
    return module, leaf, param


def load_weights(
    model: nn.Module, model_path: Path, *, tied_lm_head: bool, packed: QuantizedTensors | None = None
) -> None:
    """Copies every checkpoint tensor into the model and checks that nothing stayed uninitialised.
    With `packed` (a checkpoint read as stored), the tensors it names go there instead."""
    modules = dict(model.named_modules())
    loaded: set[tuple[str, str, str]] = set()
    for name, tensor in iter_checkpoint(model_path):
        target = _target(name)
        if target is None or (tied_lm_head and target[0] == "lm_head"):
            continue
        module_name, slice_name, param = target
        module = modules.get(module_name)
        if module is None or not hasattr(module, "load"):
            raise WeightsError(f"checkpoint tensor {name!r} has no place in the model")
        if packed is not None and param in packed.params:
            try:
                packed.add(module_name, module, slice_name, param, tensor)
            except ValueError as e:
                raise WeightsError(f"checkpoint tensor {name!r}: {e}") from e
            if param == "qweight":  # in the weight's place
                loaded.add((module_name, slice_name, "weight"))
            continue
        try:
            module.load(slice_name, param, tensor)
        except (ValueError, RuntimeError) as e:
            raise WeightsError(f"checkpoint tensor {name!r}: {e}") from e
        fused = getattr(module, "local_sizes", None)
        if fused and slice_name not in fused:  # the whole fused tensor: every slice is in
            loaded |= {(module_name, s, param) for s in fused}
        else:
            loaded.add(target)
    missing = _expected(model, tied_lm_head) - loaded
    if missing:
        sample = ", ".join(sorted(".".join(m) for m in missing)[:5])
        raise WeightsError(f"checkpoint in {model_path} lacks {len(missing)} tensors, e.g. {sample}")
    logger.info("loaded %d tensors from %s", len(loaded), model_path)


def _expected(model: nn.Module, tied_lm_head: bool) -> set[tuple[str, str, str]]:
    expected: set[tuple[str, str, str]] = set()
    for module_name, module in model.named_modules():
        if not hasattr(module, "load") or (tied_lm_head and module_name == "lm_head"):
            continue
        slices = getattr(module, "local_sizes", None) or {module_name.rpartition(".")[2]: 0}
        params = ["weight"] + (["bias"] if getattr(module, "bias", None) is not None else [])
        expected |= {(module_name, s, p) for s in slices for p in params}
    return expected
