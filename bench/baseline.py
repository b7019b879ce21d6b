"""The HF transformers + PEFT baseline: `generate` on the same random model and adapter files.

PEFT serves a batch whose rows use different adapters through `generate(..., adapter_names=[...])`
(its mixed-batch path, which splits the batch per adapter inside every LoRA layer). The baseline
times B prompts of P tokens generating exactly T new greedy tokens, with no adapter and with N
distinct adapters assigned round robin, as the engine's uniform workload does; throughput is
B·T / the whole `generate` call, the same measure as the engine's end-to-end tokens/s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class BaselineSpec:
    batch_size: int
    prompt_len: int
    new_tokens: int
    num_adapters: int  # 0: the base model alone


@dataclass
class BaselineResult:
    spec: BaselineSpec
    seconds: float
    tokens_per_s: float
    tokens: list[list[int]]  # greedy new tokens per row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate(
    model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int, **kwargs: object
) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(  # type: ignore[operator]
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )


def run_baseline(
    model_dir: Path,
    adapter_dirs: list[Path],
    specs: list[BaselineSpec],
    prompts: list[list[int]],
    dtype: torch.dtype,
    device: torch.device,
) -> list[BaselineResult]:
    """Times `generate` for each spec; adapter j (1-based) of a spec is `adapter_dirs[j - 1]`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    base = base.to(device).eval()  # type: ignore[arg-type]  # transformers' stubs miss Module.to(device)
    base.generation_config.eos_token_id = None
    results: dict[BaselineSpec, BaselineResult] = {}
    # The base model runs before PEFT injects its LoRA layers, so "no adapter" is plain transformers.
    for spec in (s for s in specs if s.num_adapters == 0):
        results[spec] = _timed(base, spec, prompts, device, {})
    num_adapters = max(s.num_adapters for s in specs)
    if num_adapters:
        model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name="a1")
        for j in range(2, num_adapters + 1):
            model.load_adapter(adapter_dirs[j - 1], adapter_name=f"a{j}")
        model.eval()
        for spec in (s for s in specs if s.num_adapters):
            names = [f"a{i % spec.num_adapters + 1}" for i in range(spec.batch_size)]
            results[spec] = _timed(model, spec, prompts, device, {"adapter_names": names})
    return [results[s] for s in specs]


def _timed(
    model: torch.nn.Module,
    spec: BaselineSpec,
    prompts: list[list[int]],
    device: torch.device,
    kwargs: dict[str, object],
) -> BaselineResult:
    input_ids = torch.tensor([p[: spec.prompt_len] for p in prompts[: spec.batch_size]], device=device)
    _generate(model, input_ids[:, :8], 2, **kwargs)  # warm up kernels and allocator
    _sync(device)
    start = time.perf_counter()
    out = _generate(model, input_ids, spec.new_tokens, **kwargs)
    _sync(device)
    seconds = time.perf_counter() - start
    return BaselineResult(
        spec=spec,
        seconds=seconds,
        tokens_per_s=spec.batch_size * spec.new_tokens / seconds,
        tokens=out[:, spec.prompt_len :].tolist(),
    )
