"""PEFT LoRA adapters: reading and checking one from its files, which are untrusted input.

An adapter becomes per-(layer, module) pairs (A [r, in], B [out, r]) and a scale lora_alpha / r
(or lora_alpha / sqrt(r) for rsLoRA), checked against the model's shapes. Everything the
safetensors header tells (names, shapes, dtypes, rank, total bytes) is checked before any tensor
is read, and nothing in adapter_config.json is run as a regex. Anything the worker cannot serve
exactly is refused with a message naming the problem.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import stat
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from loraxpy.proto.adapter_policy import not_found_message
from loraxpy.worker.encoder_config import encoder_module_name, encoder_target
from loraxpy.worker.model_config import ModelConfig

if TYPE_CHECKING:
    from loraxpy.worker.medusa import MedusaHeads

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
# PEFT adapters of fused checkpoints (Phi-3) target these; each becomes its parts, sharing A and
# splitting B's rows, which is the same delta: x A^T B^T restricted to each part's output rows.
FUSED_TARGETS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# Layer numbers are capped in digits: int() of thousands of digits raises (and would be slow).
_KEY = re.compile(r"layers\.(\d{1,6})\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")
# A module inside an MLP block, for MoE models: layers.<i>.(mlp | block_sparse_moe).<module>.lora_…
_MLP_MODULE_KEY = re.compile(r"layers\.(\d{1,6})\.(mlp|block_sparse_moe)\.([\w.]{1,200}?)\.lora_[AB]\b")
# Encoders (BERT, XLM-RoBERTa: encoder.layer.<i>.attention.self.query …; DistilBERT:
# transformer.layer.<i>.attention.q_lin …): worker/encoder_config.py maps the module to its slice.
_ENCODER_KEY = re.compile(r"(?:^|\.)layer\.(\d{1,6})\.([\w.]{1,200}?)\.lora_([AB])(?:\.default)?\.weight$")
_HEAD_KEY = re.compile(r"(?:^|\.)(lm_head)\.lora_([AB])(?:\.default)?\.weight$")
# PEFT saves the base weights of an adapted LM head / embedding next to the LoRA ("auto"), in case
# the vocabulary was resized; they must equal the model's own (checked by the runner).
_BASE_LAYER_KEY = re.compile(r"(?:^|\.)(lm_head|embed_tokens)\.base_layer\.weight$")
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
MAX_CONFIG_BYTES = 1 << 20
MAX_TOKENIZER_CONFIG_BYTES = 8 << 20  # added-token tables can be large; the template is capped apart
MAX_CHAT_TEMPLATE_CHARS = 256 << 10
# Medusa heads with their own vocabulary projections are several LM heads' worth; their shapes are
# checked against the model's from the header before any tensor is read (worker/medusa.py).
MAX_MEDUSA_BYTES = 8 << 30
MAX_HEADER_BYTES = 16 << 20  # a 100-layer adapter's header is well under 1 MiB
MAX_TENSOR_NAME_CHARS = 512


def head_key(config: ModelConfig) -> tuple[int, str]:
    """The LM head's key among an adapter's (layer, target) pairs: it comes after the last layer."""
    return (config.num_layers, "lm_head")


class AdapterError(ValueError):
    """The adapter cannot be served; the message says what is wrong with it."""


class AdapterNotFoundError(AdapterError):
    """Not found, or not allowed to this request: one answer for both, so a refusal reveals nothing."""

    def __init__(self, adapter_id: str) -> None:
        super().__init__(not_found_message(adapter_id))


class AdapterBusyError(AdapterError):
    """Too many adapter loads are in flight on this worker; retry later."""


class AdapterTimeoutError(AdapterError):
    """An adapter load took longer than --adapter-load-timeout-s."""


@dataclass(frozen=True)
class LoraAdapter:
    rank: int  # the largest rank over its modules
    # (layer index, target module) → (A [r, in], B [out, r]), as trained
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    # (layer index, target module) → lora_alpha / r (or / sqrt(r) for rsLoRA); the delta is scale·B·A
    scales: dict[tuple[int, str], float]
    # "lm_head" / "embed_tokens" → the full base weight saved with the adapter, until checked
    base_layers: dict[str, torch.Tensor] = field(default_factory=dict)
    medusa: MedusaHeads | None = None  # Medusa heads shipped with the adapter (worker/medusa.py)

    @property
    def nbytes(self) -> int:
        heads = self.medusa.nbytes if self.medusa is not None else 0
        return heads + sum(a.nbytes + b.nbytes for a, b in self.weights.values())


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter's two files, resolved: regular files, inside where they may be, within the caps."""

    config: Path
    weights: Path  # resolved: in a hub cache, a blob named by its hash
    weights_name: str = "adapter_model.safetensors"  # or adapter_model.bin: says the format
    tokenizer_config: Path | None = None  # optional: where an adapter ships its own chat template
    # Optional Medusa heads (worker/medusa.py): config.json with medusa_num_heads, and the heads
    medusa_config: Path | None = None
    medusa_weights: Path | None = None

    @property
    def nbytes(self) -> int:
        extra = [p for p in (self.medusa_config, self.medusa_weights) if p is not None]
        return self.config.stat().st_size + self.weights.stat().st_size + sum(p.stat().st_size for p in extra)

    def chat_template(self) -> str:
        """The adapter's own chat template (its tokenizer_config.json's), or "" when it has none."""
        if self.tokenizer_config is None:
            return ""
        try:
            config = json.loads(self.tokenizer_config.read_bytes())
        except (ValueError, RecursionError):
            raise AdapterError("the adapter's tokenizer_config.json is not valid JSON") from None
        template = config.get("chat_template") if isinstance(config, dict) else None
        if isinstance(template, list):  # named templates, as HF saves them: the "default" one
            named = [t for t in template if isinstance(t, dict) and t.get("name") == "default"]
            template = named[0].get("template") if named else None
        if template is None:
            return ""
        if not isinstance(template, str) or len(template) > MAX_CHAT_TEMPLATE_CHARS:
            raise AdapterError(
                f"the adapter's chat_template must be a string of at most {MAX_CHAT_TEMPLATE_CHARS} characters"
            )
        return template


def module_shape(config: ModelConfig, target: str) -> tuple[int, int]:
    """(in_features, out_features) of a target module in the full (unsharded) model."""
    h, i = config.hidden_size, config.intermediate_size
    if target in FUSED_TARGETS:
        return h, sum(module_shape(config, part)[1] for part in FUSED_TARGETS[target])
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


def max_adapter_bytes(config: ModelConfig, max_rank: int) -> int:
    """The largest adapter files this model can serve: every target at `max_rank` in fp32, the LM
    head and embedding PEFT may save beside them, and a header."""
    per_layer = sum(max_rank * sum(module_shape(config, t)) for t in TARGETS if t != "lm_head")
    head = max_rank * sum(module_shape(config, "lm_head"))
    base_layers = 2 * config.vocab_size * config.hidden_size
    return 4 * (config.num_layers * per_layer + head + base_layers) + MAX_HEADER_BYTES


def is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def find_adapter_files(folder: Path, root: Path, max_bytes: int) -> AdapterFiles:
    """The adapter's config and weights in `folder`, each resolved (symlinks too) inside `root`."""
    config = _confined_file(folder / "adapter_config.json", root, MAX_CONFIG_BYTES)
    if config is None:
        raise AdapterError(f"adapter {folder.name!r} has no adapter_config.json")
    tokenizer_config = _confined_file(folder / "tokenizer_config.json", root, MAX_TOKENIZER_CONFIG_BYTES)
    medusa_config = _confined_file(folder / "config.json", root, MAX_CONFIG_BYTES)
    medusa_weights = _confined_file(folder / "medusa_lm_head.safetensors", root, MAX_MEDUSA_BYTES)
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        weights = _confined_file(folder / name, root, max_bytes)
        if weights is not None:
            return AdapterFiles(config, weights, name, tokenizer_config, medusa_config, medusa_weights)
    raise AdapterError(f"adapter {folder.name!r} has no adapter_model.safetensors or adapter_model.bin")


def _confined_file(path: Path, root: Path, max_bytes: int) -> Path | None:
    if not path.is_symlink() and not path.exists():
        return None
    real = path.resolve()
    if not is_within(real, root):
        raise AdapterError(f"adapter file {path.name} points outside the adapter's folder")
    try:
        st = real.stat()
    except OSError:
        raise AdapterError(f"adapter file {path.name} is unreadable") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        raise AdapterError(f"adapter file {path.name} is not a regular file")
    if st.st_size > max_bytes:
        raise AdapterError(
            f"adapter file {path.name} has {st.st_size} bytes; this server takes at most {max_bytes} "
            "(--max-adapter-size-mib, or the largest adapter --max-lora-rank allows)"
        )
    return real


def _read_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise AdapterError(f"adapter_config.json is not valid JSON: {e.msg}") from None
    except (RecursionError, UnicodeDecodeError, ValueError):
        raise AdapterError("adapter_config.json is not valid JSON") from None
    if not isinstance(cfg, dict):
        raise AdapterError("adapter_config.json must hold a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type {str(cfg.get('peft_type'))[:40]!r} is not supported; only LORA")
    for key, bad, why in (
        ("bias", lambda v: v not in (None, "none"), "LoRA bias terms"),
        ("use_dora", bool, "DoRA"),
        ("modules_to_save", bool, "modules_to_save"),
        ("fan_in_fan_out", bool, "fan_in_fan_out"),
    ):
        if bad(cfg.get(key)):
            raise AdapterError(f"adapter uses {why}, which this server does not support")
    return cfg


@dataclass(frozen=True)
class TensorHeader:
    dtype: str  # safetensors' names: F32, F16, BF16, …
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES.get(self.dtype, 8)


@contextmanager
def open_weights(
    path: Path, name: str
) -> Iterator[tuple[dict[str, TensorHeader], Callable[[str], torch.Tensor]]]:
    """Each tensor's header, and a function reading one tensor: nothing is read before it is asked for.
    `name` (adapter_model.safetensors or .bin) says the format; `path` may be a blob without one."""
    try:
        if name.endswith(".safetensors"):
            _check_header_size(path)
            with safe_open(str(path), framework="pt") as f:
                headers = {}
                names = f.keys()  # safe_open is not a mapping
                for name in names:
                    view = f.get_slice(name)
                    headers[name] = TensorHeader(view.get_dtype(), tuple(view.get_shape()))
                yield headers, f.get_tensor
            return
        # mmap: the tensors' bytes stay on disk until read (old non-zip .bin files are refused)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterError("adapter_model.bin must hold a dict of tensors")
        headers = {
            str(k): TensorHeader(_DTYPE_NAMES.get(v.dtype, str(v.dtype)), tuple(v.shape))
            for k, v in state.items()
        }
        yield headers, state.__getitem__
    except (SafetensorError, RuntimeError, OSError, ValueError, pickle.UnpicklingError) as e:
        if isinstance(e, AdapterError):
            raise
        raise AdapterError(f"adapter weights in {name} are unreadable ({type(e).__name__}: {e})") from None


def _check_header_size(path: Path) -> None:
    with open(path, "rb") as f:
        prefix = f.read(8)
    if len(prefix) < 8 or struct.unpack("<Q", prefix)[0] > MAX_HEADER_BYTES:
        raise AdapterError("adapter weights are unreadable (bad safetensors header)")


@dataclass
class _Plan:
    """Which tensor is what, decided from the header alone."""

    pairs: dict[tuple[int, str], dict[str, str]] = field(default_factory=dict)  # key → {"A": name, "B": name}
    base_layers: dict[str, str] = field(default_factory=dict)  # "lm_head" → tensor name


def plan_tensors(
    headers: dict[str, TensorHeader], config: ModelConfig, max_rank: int, max_bytes: int, base: str | None
) -> _Plan:
    """Checks every tensor's name, dtype and shape, the ranks and the total bytes; reads nothing."""
    plan = _Plan()
    total = 0
    for name, h in headers.items():
        if h.dtype not in DTYPE_BYTES or len(h.shape) != 2:
            raise AdapterError(
                f"adapter tensor {name[:80]!r} is {h.dtype} {list(h.shape)}; only 2-D F32/F16/BF16"
            )
        total += h.nbytes
        if len(name) > MAX_TENSOR_NAME_CHARS:
            raise AdapterError(f"adapter tensor name {name[:80]!r}… is too long")
        base_layer = _BASE_LAYER_KEY.search(name)
        if base_layer is not None:
            if h.shape != (config.vocab_size, config.hidden_size):
                raise AdapterError(
                    f"adapter replaces the model's {base_layer[1]} weights (a resized or retrained "
                    f"vocabulary: {h.shape}); only adapters over the base model's own {base_layer[1]} can be served"
                )
            plan.base_layers[base_layer[1]] = name
            continue
        key, which = _lora_key(name, config)
        slot = plan.pairs.setdefault(key, {})
        if which in slot:
            raise AdapterError(f"adapter has two lora_{which} tensors for layer {key[0]} {key[1]}")
        slot[which] = name
    if total > max_bytes:
        raise AdapterError(f"adapter tensors take {total} bytes; this server takes at most {max_bytes}")
    if not plan.pairs:
        raise AdapterError("adapter has no LoRA weights")
    for (layer, target), ab in plan.pairs.items():
        _check_pair(layer, target, headers, ab, config, max_rank, base)
    return plan


def _lora_key(name: str, config: ModelConfig) -> tuple[tuple[int, str], str]:
    """(layer, target) and "A" or "B" of a LoRA tensor's name."""
    if config.is_encoder:
        return _encoder_key(name, config)
    match, head = _KEY.search(name), _HEAD_KEY.search(name)
    if head is not None:
        return head_key(config), head[2]
    _refuse_expert_target(name, config)
    if match is None:
        raise AdapterError(f"adapter tensor {name!r} targets a module this server cannot adapt")
    layer, target = int(match[1]), match[2]
    if (target not in TARGETS and target not in FUSED_TARGETS) or layer >= config.num_layers:
        raise AdapterError(f"adapter tensor {name!r} does not fit the model ({config.num_layers} layers)")
    return (layer, target), match[3]


def _encoder_key(name: str, config: ModelConfig) -> tuple[tuple[int, str], str]:
    match = _ENCODER_KEY.search(name)
    target = encoder_target(config, match[2]) if match is not None else None
    if match is None or target is None:
        raise AdapterError(
            f"adapter tensor {name[:200]!r} targets a module this server cannot adapt on a "
            f"{config.model_type} model (LoRA is served on the attention and feed-forward linears of "
            "its layers; a classifier or other saved modules are not)"
        )
    layer = int(match[1])
    if layer >= config.num_layers:
        raise AdapterError(f"adapter tensor {name!r} does not fit the model ({config.num_layers} layers)")
    return (layer, target), match[3]


def _refuse_expert_target(name: str, config: ModelConfig) -> None:
    """MoE models: LoRA on an MLP module of a sparse layer (an expert, the router, the shared expert
    or its gate) is refused by the module's name; attention and dense MLP layers are served."""
    match = _MLP_MODULE_KEY.search(name) if config.moe is not None else None
    if match is None:
        return
    layer, block, module = int(match[1]), match[2], match[3].removesuffix(".base_layer")
    if block == "block_sparse_moe" or (layer < config.num_layers and config.is_sparse(layer)):
        raise AdapterError(
            f"adapter tensor {name[:200]!r} targets model.layers.{layer}.{block}.{module}, part of a "
            "mixture-of-experts layer (experts, router, shared expert); this server serves LoRA on "
            "MoE models' attention projections and dense MLP layers only"
        )


def _check_pair(
    layer: int,
    target: str,
    headers: dict[str, TensorHeader],
    ab: dict[str, str],
    config: ModelConfig,
    max_rank: int,
    base: str | None,
) -> None:
    if set(ab) != {"A", "B"}:
        raise AdapterError(f"layer {layer} {target}: lora_A and lora_B must both be present")
    a, b = headers[ab["A"]].shape, headers[ab["B"]].shape
    in_features, out_features = module_shape(config, target)
    r = a[0]
    if a != (r, in_features) or b != (out_features, r):
        raise AdapterError(
            f"layer {layer} {target}: adapter shapes A {a}, B {b} do not fit the "
            f"model ({in_features} → {out_features}); was it trained for another base model"
            + (f" ({str(base)[:200]})?" if base else "?")
        )
    if not 1 <= r <= max_rank:
        raise AdapterError(f"adapter rank {r} exceeds --max-lora-rank {max_rank}")


# PEFT matches an alpha_pattern / rank_pattern key k against a module's full name with
# re.match(rf"(.*\.)?({k})$", name): the whole name, or what follows one of its dots. For plain
# names that is suffix matching, done here without compiling anything; a key with regex syntax
# (which could also take exponential time) is refused rather than guessed at.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
MAX_PATTERN_KEY_CHARS = 256


def pattern_value(patterns: object, module: str, what: str = "alpha_pattern") -> object | None:
    """The value of the first key (in the file's order, as PEFT) that names `module`, else None."""
    if not patterns:
        return None
    if not isinstance(patterns, dict):
        raise AdapterError(f"{what} must be a JSON object")
    for key, value in patterns.items():
        plain = key.replace("\\.", ".")  # an escaped dot is a dot
        if len(plain) > MAX_PATTERN_KEY_CHARS or not _PLAIN_KEY.fullmatch(plain):
            raise AdapterError(
                f"{what} key {key[:60]!r} is a regular expression; this server matches keys as module "
                "names (the whole name or a suffix after a dot, as PEFT does for plain names) and runs "
                "no regex from adapter files"
            )
        if module == plain or module.endswith("." + plain):
            return value
    return None


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterError(f"{what} must be a finite number")
    return float(value)


def module_name(layer: int, target: str, config: ModelConfig | None = None) -> str:
    """The module's name in the HF model, as PEFT's patterns see it."""
    if config is not None and config.is_encoder:
        return encoder_module_name(config, layer, target)
    if target == "lm_head":
        return "lm_head"
    block = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{block}.{target}"


def _alpha(cfg: dict, layer: int, target: str, r: int, config: ModelConfig) -> float:
    """lora_alpha for one module, honouring PEFT's alpha_pattern."""
    value = pattern_value(cfg.get("alpha_pattern"), module_name(layer, target, config))
    if value is not None:
        return _number(value, "an alpha_pattern value")
    return _number(cfg.get("lora_alpha", r), "lora_alpha")


def load_peft_adapter(
    path: Path, config: ModelConfig, max_rank: int, max_bytes: int | None = None
) -> LoraAdapter:
    """Reads the adapter in folder `path` (its files must lie inside it)."""
    limit = max_bytes if max_bytes is not None else max_adapter_bytes(config, max_rank)
    return read_adapter_files(find_adapter_files(path, path.resolve(), limit), config, max_rank, limit)


def read_adapter_files(
    files: AdapterFiles, config: ModelConfig, max_rank: int, max_bytes: int
) -> LoraAdapter:
    cfg = _read_config(files.config)
    with open_weights(files.weights, files.weights_name) as (headers, read):
        plan = plan_tensors(headers, config, max_rank, max_bytes, cfg.get("base_model_name_or_path"))
        order = (*TARGETS, *FUSED_TARGETS)
        keys = sorted(plan.pairs, key=lambda k: (k[0], order.index(k[1])))
        scales = {key: _scale(cfg, key, headers[plan.pairs[key]["A"]].shape[0], config) for key in keys}
        # Copies, not views: a .bin is memory-mapped, and its file may change or go once read.
        base_layers = {key: read(name).clone() for key, name in plan.base_layers.items()}
        weights = {
            key: (
                read(plan.pairs[key]["A"]).to(torch.float32, copy=True),
                read(plan.pairs[key]["B"]).to(torch.float32, copy=True),
            )
            for key in keys
        }
    _split_fused(weights, scales, config)
    rank = max(a.shape[0] for a, _ in weights.values())
    return LoraAdapter(rank=rank, weights=weights, scales=scales, base_layers=base_layers)


def _split_fused(
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
    scales: dict[tuple[int, str], float],
    config: ModelConfig,
) -> None:
    """Replaces each fused target (qkv_proj, gate_up_proj) by its parts, in place."""
    for key in [k for k in weights if k[1] in FUSED_TARGETS]:
        layer, fused = key
        a, b = weights.pop(key)
        scale = scales.pop(key)
        parts = FUSED_TARGETS[fused]
        sizes = [module_shape(config, part)[1] for part in parts]
        for part, b_part in zip(parts, b.split(sizes), strict=True):
            if (layer, part) in weights:
                raise AdapterError(f"layer {layer}: the adapter targets both {fused} and {part}")
            weights[(layer, part)] = (a, b_part.contiguous())
            scales[(layer, part)] = scale


def _scale(cfg: dict, key: tuple[int, str], r: int, config: ModelConfig) -> float:
    alpha = _alpha(cfg, key[0], key[1], r, config)
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
