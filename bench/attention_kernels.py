"""`python -m loraxpy.bench.attention_kernels`: each attention backend on one layer's decode step,
checked against the reference and timed against the copy bandwidth.

For a shape's heads (8b: 32 query heads over 8 KV heads of 128), every backend this machine can run
(SDPA; Triton on CUDA where installed; flash-attn / vllm-flash-attn where importable, at the block
size its paged kernel takes) first computes a mixed step (prompts, a chunk over a cached prefix,
decode rows) and the timed decode step, each compared with `paged_attention_reference` within the
startup self-check's tolerance; then the decode step of B sequences of `context` cached tokens is
timed (CUDA events, median). Its bytes are the K/V it must read once plus the queries and outputs;
bytes over time over the measured device-to-device copy bandwidth is its share. A backend that
cannot run here is listed with why, so the GPU check says which attention paths were measured
(flash-attn's stays unmeasured where neither library is installed, as on the lent GPU image).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from loraxpy.bench.bounds import measure_copy_bandwidth
from loraxpy.bench.lora_kernels import _median_seconds
from loraxpy.bench.shapes import SHAPES, ModelShape
from loraxpy.kernels.attention import (
    AttentionBackend,
    AttentionMetadata,
    paged_attention_reference,
    select_attention_backend,
)
from loraxpy.worker.self_check import TOLERANCE, relative_error

MIXED = ((37, 37), (1, 300), (9, 50), (1, 1000))  # (query tokens, cached tokens after the step)


@dataclass(frozen=True)
class AttentionRun:
    backend: str
    block_size: int
    batch_size: int
    context_len: int
    error: float | None  # relative L2 error of the decode step against the reference (None: failed)
    mixed_error: float | None
    microseconds: float | None  # median decode step, one layer; None when the check failed
    bytes: int
    gb_per_s: float | None
    efficiency: float | None  # of the copy bandwidth
    note: str = ""


def candidates(
    device: torch.device, dtype: torch.dtype
) -> tuple[list[tuple[AttentionBackend, int]], dict[str, str]]:
    """(backend, block size) for each backend that can run here, and why each other one cannot."""
    from loraxpy.kernels import attention_flash, attention_triton

    runnable = [(select_attention_backend(device, "sdpa"), 16)]
    skipped: dict[str, str] = {}
    if device.type == "cuda" and attention_triton.available():
        runnable.append((select_attention_backend(device, "triton"), 16))
    else:
        skipped["triton"] = "needs CUDA and the triton package"
    library = attention_flash.find_library()
    reason = (
        "neither flash-attn nor vllm-flash-attn is importable"
        if library is None
        else attention_flash.unusable_reason(library, dtype, None)
    )
    if library is not None and reason is None:
        runnable.append((attention_flash.flash_backend(library), library.block_multiple))
    else:
        skipped["flash"] = reason or ""
    return runnable, skipped


def _paged_case(
    shape: ModelShape,
    seqs: tuple[tuple[int, int], ...],
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Random query and K/V caches with every sequence's blocks in shuffled order."""
    per_seq = [-(-s // block_size) for _, s in seqs]
    order = torch.randperm(sum(per_seq), device=device).tolist()
    tables, start = [], 0
    for n in per_seq:
        tables.append(order[start : start + n])
        start += n
    meta = AttentionMetadata.build([q for q, _ in seqs], [s for _, s in seqs], tables, device)
    cache_shape = (len(order), block_size, shape.num_kv_heads, shape.head_dim)
    k_cache = torch.randn(cache_shape, device=device).to(dtype)
    v_cache = torch.randn(cache_shape, device=device).to(dtype)
    query = torch.randn(sum(q for q, _ in seqs), shape.num_heads, shape.head_dim, device=device).to(dtype)
    return query, k_cache, v_cache, meta


def _error(backend: AttentionBackend, case: tuple, scale: float) -> float:  # type: ignore[type-arg]
    got = backend.attend(*case, scale)
    return relative_error(got, paged_attention_reference(*case, scale))


def measure(
    backend: AttentionBackend,
    block_size: int,
    shape: ModelShape,
    *,
    batch: int,
    context: int,
    dtype: torch.dtype,
    device: torch.device,
    bandwidth: float,
    repeats: int,
) -> AttentionRun:
    scale = shape.head_dim**-0.5
    decode = _paged_case(shape, ((1, context),) * batch, block_size, dtype, device)
    moved = (2 * batch * context * shape.num_kv_heads + 2 * batch * shape.num_heads) * shape.head_dim
    moved *= dtype.itemsize
    try:
        mixed_error = _error(backend, _paged_case(shape, MIXED, block_size, dtype, device), scale)
        error = _error(backend, decode, scale)
    except Exception as e:  # a launch or compile error: reported, the next backend still runs
        note = f"{type(e).__name__}: {str(e).strip()[:200]}"
        return AttentionRun(
            backend.name, block_size, batch, context, None, None, None, moved, None, None, note
        )
    tolerance = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    if not (error <= tolerance and mixed_error <= tolerance):
        note = f"differs from the reference (tolerance {tolerance:.0e}): not timed"
        return AttentionRun(
            backend.name, block_size, batch, context, error, mixed_error, None, moved, None, None, note
        )
    seconds = _median_seconds(lambda _: backend.attend(*decode, scale), device, repeats)
    return AttentionRun(
        backend.name, block_size, batch, context, error, mixed_error,
        seconds * 1e6, moved, moved / seconds / 1e9, moved / seconds / bandwidth,
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loraxpy.bench.attention_kernels", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--context-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--output", type=Path, required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device, dtype, shape = torch.device(args.device), getattr(torch, args.dtype), SHAPES[args.shape]
    bandwidth = measure_copy_bandwidth(device)
    runnable, skipped = candidates(device, dtype)
    runs: list[AttentionRun] = []

    def save() -> None:  # after every backend, whole: a run stopped at a deadline keeps what it timed
        doc = {
            "device": str(device),
            "dtype": args.dtype,
            "shape": shape.name,
            "copy_bandwidth_gb_per_s": bandwidth / 1e9,
            "runs": [asdict(r) for r in runs],
            "not_measured": skipped,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        partial = args.output.with_name(args.output.name + ".partial")
        partial.write_text(json.dumps(doc, indent=1))
        partial.replace(args.output)

    for backend, block_size in runnable:
        run = measure(
            backend, block_size, shape, batch=args.batch_size, context=args.context_len, dtype=dtype,
            device=device, bandwidth=bandwidth, repeats=args.repeats,
        )  # fmt: skip
        runs.append(run)
        save()
        timing = (
            "not timed"
            if run.microseconds is None
            else f"{run.microseconds:9.1f} us {run.gb_per_s:8.1f} GB/s"
        )
        share = "" if run.efficiency is None else f" {run.efficiency:6.1%} of copy"
        print(
            f"attention {run.backend:>16} block {block_size:<4} B={run.batch_size} ctx={run.context_len}: "
            f"{timing}{share} (error {run.error}, mixed {run.mixed_error}) {run.note}",
            flush=True,
        )
    for name, why in skipped.items():
        print(f"attention {name:>16}: not measured ({why})", flush=True)
    save()
    return 0 if all(r.microseconds is not None for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
