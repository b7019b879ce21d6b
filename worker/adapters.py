"""PEFT LoRA adapters: reading and checking one from disk, and where its files may come from.

An adapter becomes per-(layer, module) pairs (A [r, in], B [out, r]) and a scale lora_alpha / r
(or lora_alpha / sqrt(r) for rsLoRA), checked against the model's shapes. Anything the
worker cannot serve exactly is refused with a message naming the problem.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loraxpy.worker.model_config import ModelConfig
from loraxpy.worker.model_source import ModelSourceError, hub_snapshot

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")
_HEAD_KEY = re.compile(r"(?:^|\.)(lm_head)\.lora_([AB])(?:\.default)?\.weight$")
# PEFT saves the base weights of an adapted LM head / embedding next to the LoRA ("auto"), in case
# the vocabulary was resized; they must equal the model's own (checked by the runner).
_BASE_LAYER_KEY = re.compile(r"(?:^|\.)(lm_head|embed_tokens)\.base_layer\.weight$")


def head_key(config: ModelConfig) -> tuple[int, str]:
    """The LM head's key among an adapter's (layer, target) pairs: it comes after the last layer."""
    return (config.num_layers, "lm_head")


class AdapterError(ValueError):
    """The adapter cannot be served; the message says what is wrong with it."""


@dataclass(frozen=True)
class LoraAdapter:
    rank: int  # the largest rank over its modules
    # (layer index, target module) → (A [r, in], B [out, r]), as trained
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    # (layer index, target module) → lora_alpha / r (or / sqrt(r) for rsLoRA); the delta is scale·B·A
    scales: dict[tuple[int, str], float]
    # "lm_head" / "embed_tokens" → the full base weight saved with the adapter, until checked
    base_layers: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def module_shape(config: ModelConfig, target: str) -> tuple[int, int]:
    """(in_features, out_features) of a target module in the full (unsharded) model."""
    h, i = config.hidden_size, config.intermediate_size
    return {
        "q_proj": (h, config.q_size),
        "k_proj": (h, config.kv_size),
        "v_proj": (h, config.kv_size),
        "o_proj": (config.q_size, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
        "lm_head": (h, config.vocab_size),
    }[target]


def resolve_local_adapter(adapter_id: str, adapter_root: Path | None) -> Path:
    """A local adapter path, which must lie inside --adapter-root after resolving `..` and symlinks."""
    if adapter_root is None:
        raise AdapterError("local adapters are disabled: start the server with --adapter-root")
    root = adapter_root.resolve()
    path = (root / adapter_id).resolve()  # an absolute adapter_id replaces root here, then is checked
    if path != root and root not in path.parents:
        raise AdapterError(f"adapter path {adapter_id!r} is outside --adapter-root")
    if not path.is_dir():
        raise AdapterError(f"adapter {adapter_id!r} not found under --adapter-root")
    return path


ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]


def resolve_hub_adapter(adapter_id: str, *, token: str | None, cache_dir: Path | None, offline: bool) -> Path:
    """A hub adapter's folder, from the local hub cache or downloaded with `token`."""
    try:
        return hub_snapshot(
            adapter_id,
            revision=None,
            token=token,
            cache_dir=cache_dir,
            offline=offline,
            patterns=ADAPTER_PATTERNS,
            what="adapter",
        )
    except ModelSourceError as e:
        raise AdapterError(
            f"{e} (not found)" if "does not exist" in str(e) or "not in the local" in str(e) else str(e)
        ) from None


def resolve_s3_adapter(adapter_id: str, cache_dir: Path) -> Path:
    """Downloads s3://bucket/prefix (or bucket/prefix) once into cache_dir; boto3 reads credentials
    and AWS_ENDPOINT_URL from the environment."""
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise AdapterError("s3 adapters need boto3: pip install 'loraxpy[s3]'") from None
    bucket, _, prefix = adapter_id.removeprefix("s3://").partition("/")
    if not bucket or not prefix or ".." in prefix.split("/"):
        raise AdapterError(f"s3 adapter id {adapter_id!r} must look like s3://bucket/path/to/adapter")
    target = cache_dir / "adapters" / "s3" / bucket / prefix
    if (target / "adapter_config.json").exists():
        return target
    tmp = target.with_name(f".{target.name}.partial")
    try:
        client = boto3.client("s3")
        listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
        keys = [
            o["Key"] for o in listing.get("Contents", []) if o["Key"].rsplit("/", 1)[-1] in ADAPTER_PATTERNS
        ]
        if not keys:
            raise AdapterError(f"s3 adapter {adapter_id!r} not found (no adapter files under that prefix)")
        tmp.mkdir(parents=True, exist_ok=True)
        for key in keys:
            client.download_file(bucket, key, str(tmp / key.rsplit("/", 1)[-1]))
    except (BotoCoreError, ClientError) as e:
        raise AdapterError(f"s3 adapter {adapter_id!r} cannot be fetched ({type(e).__name__}: {e})") from None
    tmp.replace(target)
    return target


def _read_config(path: Path) -> dict:
    config_path = path / "adapter_config.json"
    if not config_path.exists():
        raise AdapterError(f"adapter {path.name!r} has no adapter_config.json")
    try:
        cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"adapter_config.json is not valid JSON: {e.msg}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type {cfg.get('peft_type')!r} is not supported; only LORA")
    for key, bad, why in (
        ("bias", lambda v: v not in (None, "none"), "LoRA bias terms"),
        ("use_dora", bool, "DoRA"),
        ("modules_to_save", bool, "modules_to_save"),
        ("fan_in_fan_out", bool, "fan_in_fan_out"),
    ):
        if bad(cfg.get(key)):
            raise AdapterError(f"adapter uses {why}, which this server does not support")
    return cfg


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    st, binary = path / "adapter_model.safetensors", path / "adapter_model.bin"
    try:
        if st.exists():
            return load_file(str(st))
        if binary.exists():
            return torch.load(binary, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, ValueError) as e:
        raise AdapterError(
            f"adapter weights in {path.name!r} are unreadable ({type(e).__name__}: {e})"
        ) from None
    raise AdapterError(f"adapter {path.name!r} has no adapter_model.safetensors or adapter_model.bin")


def _alpha(cfg: dict, layer: int, target: str, r: int) -> float:
    """lora_alpha for one module, honouring PEFT's alpha_pattern (keys match module-name suffixes)."""
    block = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    module = "lm_head" if target == "lm_head" else f"model.layers.{layer}.{block}.{target}"
    for key, value in (cfg.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return float(value)
    return float(cfg.get("lora_alpha", r))


def load_peft_adapter(path: Path, config: ModelConfig, max_rank: int) -> LoraAdapter:
    cfg = _read_config(path)
    base = cfg.get("base_model_name_or_path")
    tensors = _read_tensors(path)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    base_layers: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        base_layer = _BASE_LAYER_KEY.search(name)
        if base_layer is not None:
            base_layers[base_layer[1]] = tensor
            continue
        match, head = _KEY.search(name), _HEAD_KEY.search(name)
        if head is not None:
            (layer, target), which = head_key(config), head[2]
        elif match is not None:
            layer, target, which = int(match[1]), match[2], match[3]
        else:
            raise AdapterError(f"adapter tensor {name!r} targets a module this server cannot adapt")
        if target not in TARGETS or (target != "lm_head" and layer >= config.num_layers):
            raise AdapterError(f"adapter tensor {name!r} does not fit the model ({config.num_layers} layers)")
        pairs.setdefault((layer, target), {})[which] = tensor
    if not pairs:
        raise AdapterError("adapter has no LoRA weights")
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    scales: dict[tuple[int, str], float] = {}
    for (layer, target), ab in sorted(pairs.items(), key=lambda kv: (kv[0][0], TARGETS.index(kv[0][1]))):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"layer {layer} {target}: lora_A and lora_B must both be present")
        a, b = ab["A"].float(), ab["B"].float()
        in_features, out_features = module_shape(config, target)
        r = a.shape[0]
        if a.shape != (r, in_features) or b.shape != (out_features, r):
            raise AdapterError(
                f"layer {layer} {target}: adapter shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the "
                f"model ({in_features} → {out_features}); was it trained for another base model"
                + (f" ({base})?" if base else "?")
            )
        if r > max_rank:
            raise AdapterError(f"adapter rank {r} exceeds --max-lora-rank {max_rank}")
        alpha = _alpha(cfg, layer, target, r)
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        weights[(layer, target)] = (a, b)
        scales[(layer, target)] = scale
    rank = max(a.shape[0] for a, _ in weights.values())
    return LoraAdapter(rank=rank, weights=weights, scales=scales, base_layers=base_layers)
