"""Every Triton kernel compiled for sm_80 and sm_90 without a GPU, as the launchers specialise it.

The interpreter tests (test_attention_triton.py, test_lora_triton.py) never run Triton's compiler;
these compile each distinct specialisation that lorax-bench's model shapes and the default model
launch (kernels/triton_coverage.py builds them with the kernels' own launch functions) and fail
on any spill or shared memory over the target's limit. All compile once per session, in worker
processes; docs/triton-kernels.md is the table of what they found.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is a dev dependency (make install)")
tl = triton.language

from loraxpy.kernels import triton_aot, triton_coverage  # noqa: E402
from loraxpy.kernels.triton_launch import Launch  # noqa: E402

pytestmark = pytest.mark.aot

DOC = Path(__file__).resolve().parents[2] / "docs" / "triton-kernels.md"
PLANNED = triton_aot.plan(triton_coverage.all_launches(triton_coverage.coverage_models()))


@pytest.fixture(scope="session")
def reports() -> dict[triton_aot.Job, triton_aot.Report]:
    """Every planned kernel, and the one broken on purpose, compiled once per session by one worker
    process per core."""
    jobs = [p.job for p in PLANNED] + [broken_job()]
    return dict(zip(jobs, triton_aot.compile_jobs(jobs, triton_aot.default_workers()), strict=True))


@pytest.mark.parametrize("planned", PLANNED, ids=[triton_aot.describe(p.job) for p in PLANNED])
def test_kernel_compiles_within_the_targets_limits(reports, planned: triton_aot.Planned) -> None:
    found = triton_aot.problems(planned.job, reports[planned.job])
    uses = ", ".join(str(u) for u in planned.uses)
    assert not found, "\n".join(found) + f"\nlaunched by: {uses}"


def test_every_kernel_and_launch_is_covered() -> None:
    """Each kernel module's kernels, each model, dtype and target appear in the plan."""
    from loraxpy.kernels import attention_triton, lora_triton, moe_triton, w4a16_triton

    kernels = {p.job.kernel for p in PLANNED}
    shipped = {attention_triton.store_kernel, attention_triton.attention_kernel}
    shipped |= {lora_triton.shrink_kernel, lora_triton.expand_kernel}
    shipped |= {moe_triton.gate_up_kernel, moe_triton.down_kernel, w4a16_triton.w4a16_kernel}
    assert kernels == {k.__name__ for k in shipped}
    uses = {(u.model, u.dtype) for p in PLANNED for u in p.uses}
    families = {"qwen3-8b", "gemma2-9b", "phi3-mini", "mixtral-8x7b", "qwen3-30b-a3b"}
    assert {m for m, _ in uses} == {"tiny", "1b", "8b", "smollm2-135m"} | families
    moe_kernels = {"gate_up_kernel", "down_kernel"}
    assert {u.model for p in PLANNED if p.job.kernel in moe_kernels for u in p.uses} == {
        "mixtral-8x7b",
        "qwen3-30b-a3b",
    }
    w4a16 = [p for p in PLANNED if p.job.kernel == "w4a16_kernel"]
    assert {u.model for p in w4a16 for u in p.uses} == {m for m, _ in uses}  # every model's packed linears
    # a decode and a prefill step's row blocks, rows in runs and gathered, each dtype and target
    assert len(w4a16) == 2 * 2 * 3 * 2
    assert {d for _, d in uses} == {"float32", "float16", "bfloat16"}
    assert {p.job.arch for p in PLANNED} == {80, 90}


def test_equal_specialisations_compile_once() -> None:
    """Shrink takes its input size as an argument, so its layers and models share kernels."""
    shrinks = [p for p in PLANNED if p.job.kernel == "shrink_kernel"]
    # one per dtype, padded rank and target, whatever the model or layer
    assert len(shrinks) == 3 * len(triton_coverage.MAX_RANKS) * 2
    assert len({p.job.key() for p in PLANNED}) == len(PLANNED)


def test_the_docs_table_lists_every_compiled_kernel() -> None:
    """docs/triton-kernels.md is regenerated when a specialisation appears or goes (numbers may drift)."""
    spec = re.compile(r"^\| (\w+) \| sm_(\d+) \| (\w+) \| ([^|]*) \|", re.MULTILINE)
    in_doc = sorted(spec.findall(DOC.read_text()))
    planned = sorted(
        (p.job.kernel, str(p.job.arch), p.job.dtype, ", ".join(f"{k}={v}" for k, v in p.job.constexprs))
        for p in PLANNED
    )
    assert in_doc == planned, "run: python -m loraxpy.kernels.triton_coverage --write docs/triton-kernels.md"


# A kernel broken on purpose: a running sum over 8192 values on one warp keeps 256 values per
# thread live, past the 255 registers a thread has.
def hoarding_kernel(x_ptr, out_ptr, N: tl.constexpr):  # type: ignore[no-untyped-def]
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, tl.cumsum(x * x, 0) + x)


def broken_job() -> triton_aot.Job:
    x = torch.empty(8192, device="meta")
    return triton_aot.Job.of(Launch(hoarding_kernel, (1,), (x, x), {"N": 8192}, {"num_warps": 1}), 90)


def test_a_kernel_that_spills_fails_the_same_check(reports) -> None:
    job = broken_job()
    [found] = triton_aot.problems(job, reports[job])
    assert reports[job].spill_bytes > 0
    assert found.startswith("hoarding_kernel sm_90 float32 [N=8192, num_warps=1]: spills")


def test_shared_memory_and_registers_past_the_target_fail_the_check() -> None:
    job = triton_aot.Job.of(Launch(hoarding_kernel, (1,), (), {"N": 16}), 80)
    fits = triton_aot.Report(n_regs=255, shared=166912, num_warps=8, num_stages=3)
    assert triton_aot.problems(job, fits) == []
    [shared] = triton_aot.problems(job, replace(fits, shared=166913))
    assert (
        shared
        == "hoarding_kernel sm_80 - [N=16]: needs 166913 bytes of shared memory, sm_80 (A100) has 166912"
    )
    [registers] = triton_aot.problems(job, replace(fits, num_warps=16))  # 255 × 512 threads > 65536
    assert registers.endswith("255 registers × 512 threads exceed sm_80 (A100)'s")
    [error] = triton_aot.problems(job, triton_aot.Report(error="PTXASError: boom"))
    assert error == "hoarding_kernel sm_80 - [N=16]: does not compile: PTXASError: boom"
