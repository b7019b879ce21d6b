"""`--quantize`: LoRAX's scheme names, which of them this server runs, and what a checkpoint says.

No torch here: the launcher checks the flag before it starts any shard, and the worker checks the
checkpoint's own `quantization_config` against it (`checkpoint_scheme`).
"""

from __future__ import annotations

from typing import Any

# Scheme → None where this server runs it, else why not (said at startup). LoRAX's names.
SCHEMES: dict[str, str | None] = {
    "bitsandbytes": None,  # int8, per output channel (LLM.int8() without outliers)
    "bitsandbytes-nf4": None,
    "bitsandbytes-fp4": None,
    "fp8": None,  # e4m3, a scale per output channel; or a compressed-tensors FP8 checkpoint, read as stored
    "gptq": None,  # pre-quantized GPTQ checkpoints, read as stored (worker/gptq.py)
    "awq": None,  # pre-quantized AWQ checkpoints (AutoAWQ's GEMM layout), read as stored
    "eetq": "EETQ needs its CUDA kernels, which this server does not carry",
    "hqq-4bit": "HQQ is not implemented yet",
    "hqq-3bit": "HQQ is not implemented yet",
    "hqq-2bit": "HQQ is not implemented yet",
}


# Schemes whose weights come quantized in the checkpoint; the others quantize full-precision weights at load.
PREQUANTIZED = ("gptq", "awq")


def check_scheme_name(scheme: str | None) -> None:
    """Refuses a name LoRAX does not have, and a scheme this server does not run, with the reason."""
    if not scheme:  # unset (an empty QUANTIZE too)
        return
    if scheme not in SCHEMES:
        raise ValueError(f"--quantize must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    reason = SCHEMES[scheme]
    if reason is not None:
        runnable = ", ".join(name for name, why in SCHEMES.items() if why is None)
        raise ValueError(f"--quantize {scheme} is not supported: {reason} (this server runs {runnable})")


def checkpoint_scheme(config: dict[str, Any]) -> str | None:
    """The `--quantize` name that a config.json's `quantization_config` stands for; None: not quantized.

    An unknown method comes back as its own name, so it can only ever disagree with the flag.
    """
    q = config.get("quantization_config")
    if not q:
        return None
    method = str(q.get("quant_method", "unknown")).lower()
    if method == "bitsandbytes":
        if q.get("load_in_4bit"):
            return f"bitsandbytes-{q.get('bnb_4bit_quant_type', 'fp4')}"
        return "bitsandbytes"
    if method == "compressed-tensors":
        weights = compressed_tensors_weights(q)
        if weights.get("type") == "float" and weights.get("num_bits") == 8:
            return "fp8"
        return f"compressed-tensors {q.get('format') or 'unknown format'}"
    if method in ("fp8", "fbgemm_fp8"):
        return "fp8"
    if method == "hqq":
        return f"hqq-{q.get('nbits', 4)}bit"
    return method


def compressed_tensors_weights(q: dict[str, Any]) -> dict[str, Any]:
    """The weights' quantization args of a compressed-tensors quantization_config ({} if none), which
    every config group must share (one scheme for all the linears it quantizes)."""
    groups = [g.get("weights") or {} for g in (q.get("config_groups") or {}).values()]
    if not groups:
        return {}
    first = groups[0]
    return first if all(g == first for g in groups) else {"mixed": True}


def reads_stored_fp8(q: dict[str, Any]) -> str | None:
    """None when `--quantize fp8` reads this compressed-tensors checkpoint as stored: e4m3 weights with a
    scale per output channel or per tensor (LLM Compressor's FP8 and FP8_DYNAMIC); else why not."""
    if str(q.get("quant_method", "")).lower() != "compressed-tensors":
        return f"{q.get('quant_method')} FP8 checkpoints are not read (compressed-tensors ones are)"
    weights = compressed_tensors_weights(q)
    if q.get("format") != "float-quantized":
        return f"compressed-tensors format {q.get('format')!r} is not read (float-quantized is)"
    if weights.get("strategy") not in ("channel", "tensor") or not weights.get("symmetric", True):
        return (
            f"compressed-tensors FP8 weights with strategy {weights.get('strategy')!r} are not read "
            "(symmetric channel and tensor scales are)"
        )
    if weights.get("dynamic"):
        return "compressed-tensors FP8 weights quantized dynamically are not read"
    return None


def check_checkpoint(config: dict[str, Any], scheme: str | None) -> None:
    """Refuses a checkpoint whose own quantization disagrees with `--quantize`, a pre-quantized scheme
    (gptq, awq) over a checkpoint that is not, and any other scheme over a checkpoint stored quantized
    (those quantize a full-precision checkpoint at load)."""
    stored = checkpoint_scheme(config)
    if stored is None:
        if scheme in PREQUANTIZED:
            raise ValueError(
                f"--quantize {scheme} reads a pre-quantized {scheme.upper()} checkpoint, but this one has "
                "no quantization_config: point --model-id at a quantized model, or use --quantize fp8 or "
                "bitsandbytes to quantize this one at load"
            )
        return
    if scheme is None:
        raise ValueError(
            f"the checkpoint is quantized ({stored}, from its quantization_config) but --quantize is not set"
        )
    if stored != scheme:
        raise ValueError(
            f"--quantize {scheme} disagrees with the checkpoint's quantization_config ({stored})"
        )
    if scheme in PREQUANTIZED:
        return
    if scheme == "fp8":
        why_not = reads_stored_fp8(config["quantization_config"])
        if why_not is None:
            return
        raise ValueError(
            f"the checkpoint is stored quantized (fp8) in a way this server does not read: {why_not}"
        )
    raise ValueError(
        f"the checkpoint is stored quantized ({stored}); this server reads only full-precision checkpoints "
        f"and quantizes them itself at load: point --model-id at the unquantized model"
    )
