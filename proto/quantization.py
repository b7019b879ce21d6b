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
    "fp8": None,  # e4m3, a scale per output channel
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
    if method in ("fp8", "compressed-tensors", "fbgemm_fp8"):
        return "fp8"
    if method == "hqq":
        return f"hqq-{q.get('nbits', 4)}bit"
    return method


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
    raise ValueError(
        f"the checkpoint is stored quantized ({stored}); this server reads only full-precision checkpoints "
        f"and quantizes them itself at load: point --model-id at the unquantized model"
    )
