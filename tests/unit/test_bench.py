"""lorax-bench end to end on CPU with the tiny shape: outputs, byte-bound arithmetic, and correct tokens."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loraxpy.bench.cli import main
from loraxpy.bench.shapes import SHAPES
from loraxpy.bench.workloads import Workload, default_workloads

pytestmark = pytest.mark.slow

SHAPE = SHAPES["tiny"]
MIXED_RANKS = (4, 8)
ARGS = [
    "--device=cpu",
    "--shapes=tiny",
    "--batch-sizes=1,4",
    "--context-lens=12",
    "--adapter-counts=3",
    "--workloads=base,single,uniform,zipf,mixed",
    "--rank=8",
    "--mixed-ranks=4,8",
    "--mixed-adapters=2",
    "--warmup-steps=1",
    "--decode-steps=3",
    "--baseline-batch=3",
    "--baseline-prompt-len=8",
    "--baseline-new-tokens=4",
    "--baseline-adapters=3",
]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    tmp = tmp_path_factory.mktemp("bench")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*ARGS, f"--output={tmp / 'out.json'}", f"--workdir={tmp / 'work'}"])
    assert code == 0
    return json.loads((tmp / "out.json").read_text()), tmp, out.getvalue()


def test_json_table_and_plot_are_written(bench: tuple[dict, Path, str]) -> None:
    doc, tmp, stdout = bench
    assert doc["machine"]["copy_bandwidth_gb_per_s"] > 0
    names = {r["workload"] for r in doc["runs"]}
    assert names == {"base", "single", "uniform-3", "zipf-3", "mixed-2"}
    assert len(doc["runs"]) == 2 * len(names)  # two batch sizes, one context length
    for run in doc["runs"]:
        for key in (
            "decode_step_ms",
            "decode_tokens_per_s",
            "prefill_tokens_per_s",
            "decode_bound_ms",
            "decode_efficiency",
            "prefill_efficiency",
        ):
            assert math.isfinite(run[key]) and run[key] > 0, key
        assert len(run["first_tokens"]) == 1 + run["warmup_steps"] + run["decode_steps"]
        assert run["engine_paths"] == "attention=sdpa lora=torch decode=eager"  # CPU defaults
    assert "mixed-2" in stdout and "speed-up" in stdout
    png = (tmp / "out.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def _checkpoint_weight_bytes(model_dir: Path) -> int:
    """Bytes of every tensor in the written checkpoint but the embedding table."""
    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                if name != "model.embed_tokens.weight":
                    t = f.get_slice(name)
                    total += math.prod(t.get_shape()) * 4
    return total


def test_byte_bound_is_weights_plus_kv_plus_distinct_adapters_over_bandwidth(
    bench: tuple[dict, Path, str],
) -> None:
    doc, tmp, _ = bench
    h, f, v, layers = SHAPE.hidden_size, SHAPE.intermediate_size, SHAPE.vocab_size, SHAPE.num_layers
    q, kv = SHAPE.num_heads * SHAPE.head_dim, SHAPE.num_kv_heads * SHAPE.head_dim
    params = layers * (h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h) + h + v * h  # no embedding table
    assert params * 4 == _checkpoint_weight_bytes(tmp / "work" / "tiny-float32")
    kv_per_token = 2 * layers * kv * 4
    per_rank = layers * (2 * (h + q) + 2 * (h + kv) + 3 * (h + f)) * 4
    bandwidth = doc["machine"]["copy_bandwidth_gb_per_s"] * 1e9
    for run in doc["runs"]:
        b, ctx, w, n = run["batch_size"], run["context_len"], run["warmup_steps"], run["decode_steps"]
        kv_tokens = b * (ctx + 1 + w + (n - 1) / 2)  # mean length over the timed steps
        ranks = _distinct_ranks(run)
        assert run["distinct_adapters"] == len(ranks)
        expected = (params * 4 + kv_tokens * kv_per_token + sum(ranks) * per_rank) / bandwidth
        assert run["weight_bytes"] == params * 4
        assert run["decode_bound_ms"] == pytest.approx(expected * 1e3, rel=1e-9)
        assert run["decode_efficiency"] == pytest.approx(expected / (run["decode_step_ms"] / 1e3), rel=1e-9)


def _distinct_ranks(run: dict) -> list[int]:
    b = run["batch_size"]
    if run["kind"] == "base":
        return []
    if run["kind"] == "single":
        return [8]
    if run["kind"] == "mixed":
        return [MIXED_RANKS[(j - 1) % 2] for j in {i % 2 + 1 for i in range(b)}]
    if run["kind"] == "uniform":
        return [8] * min(3, b)
    assert run["kind"] == "zipf"
    assert 1 <= run["distinct_adapters"] <= min(3, b)
    return [8] * run["distinct_adapters"]


def _hf_greedy(model_dir: Path, adapter: Path | None, prompt: list[int], n: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def test_engine_tokens_equal_transformers_and_peft_and_adapters_change_them(
    bench: tuple[dict, Path, str],
) -> None:
    doc, tmp, _ = bench
    model_dir = tmp / "work" / "tiny-float32"
    runs = {r["workload"]: r for r in doc["runs"] if r["batch_size"] == 4}
    base, single = runs["base"], runs["single"]
    assert base["first_prompt"] == single["first_prompt"]
    assert base["first_adapter"] is None and single["first_adapter"] is not None
    n = len(base["first_tokens"])
    assert base["first_tokens"] == _hf_greedy(model_dir, None, base["first_prompt"], n)
    adapter = model_dir / "adapters" / single["first_adapter"]
    assert single["first_tokens"] == _hf_greedy(model_dir, adapter, single["first_prompt"], n)
    assert single["first_tokens"] != base["first_tokens"], "the adapter changes the output"


def test_peft_baseline_agrees_token_for_token_and_gives_a_speed_up(bench: tuple[dict, Path, str]) -> None:
    doc, _, _ = bench
    assert [b["num_adapters"] for b in doc["baseline"]] == [0, 3]
    for b in doc["baseline"]:
        assert b["rows"] == 3 and b["rows_equal"] == 3  # fp32: the engine's mixed batch equals PEFT's
        assert math.isfinite(b["speedup"]) and b["speedup"] > 0
        assert b["speedup"] == pytest.approx(b["engine_tokens_per_s"] / b["hf_tokens_per_s"])


def test_workload_assignments() -> None:
    rng = random.Random(0)
    uniform = Workload("u", "uniform", 3).assign(7, rng)
    assert uniform == [1, 2, 3, 1, 2, 3, 1]
    skewed = Workload("z", "zipf", 8, zipf_s=4.0).assign(200, rng)
    assert set(skewed) <= set(range(1, 9)) and skewed.count(1) > 150
    mixed = Workload("m", "mixed", 4, ranks=(8, 64))
    assert [mixed.rank_of(j) for j in (1, 2, 3, 4)] == [8, 64, 8, 64]
    names = [w.name for w in default_workloads((1, 8), kinds=("base", "zipf", "mixed"), mixed_adapters=4)]
    assert names == ["base", "zipf-1", "zipf-8", "mixed-4"]


def test_bad_flags_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--device=cpu", "--shapes=70b"]) == 2
    assert "unknown shapes" in capsys.readouterr().err


def test_a_bench_stopped_midway_has_written_every_run_it_finished(
    bench: tuple[dict, Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/gpu_check.py kills a shape's stage at its deadline: the JSON holds the runs before it."""
    from loraxpy.bench.engine import EngineBench

    _, tmp, _ = bench
    real_run, calls = EngineBench.run, []

    def stop_at_the_third(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what a deadline's signal does to the stage
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(EngineBench, "run", stop_at_the_third)
    output = tmp / "stopped.json"
    args = [a for a in ARGS if not a.startswith(("--workloads", "--batch-sizes"))]
    with pytest.raises(KeyboardInterrupt), contextlib.redirect_stdout(io.StringIO()):
        main([*args, "--workloads=base,single,uniform", "--batch-sizes=4", "--no-baseline",
              f"--output={output}", f"--workdir={tmp / 'work'}"])  # fmt: skip
    doc = json.loads(output.read_text())
    assert [r["workload"] for r in doc["runs"]] == ["base", "single"]
    assert all(r["decode_tokens_per_s"] > 0 for r in doc["runs"])
