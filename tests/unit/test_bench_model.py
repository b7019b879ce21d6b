"""`lorax-bench model` end to end on a tiny random Llama with a word-level tokenizer: every path runs
(floor, engine, a real lorax-launcher over HTTP, HF + PEFT), on the same prompts and adapters."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path

import pytest
import torch

from loraxpy.bench.cli import main
from loraxpy.bench.floor import linear_shapes
from loraxpy.bench.shapes import SHAPES, write_random_model

pytestmark = pytest.mark.slow

BATCH_SIZES = (1, 3)
PROMPT_LEN, NEW_TOKENS = 6, 4
WORKLOADS = ("base", "single", "uniform-2")


def write_word_tokenizer(path: Path, vocab_size: int) -> None:
    """tokenizer.json: token i is the word `w{i}` (0 is unknown), split at whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    tmp = tmp_path_factory.mktemp("bench-model")
    model = write_random_model(SHAPES["tiny"], tmp / "tiny", torch.float32, seed=3)
    write_word_tokenizer(model, SHAPES["tiny"].vocab_size)
    argv = [
        "model",
        f"--model-id={model}",
        f"--batch-sizes={','.join(map(str, BATCH_SIZES))}",
        "--adapter-counts=2",
        f"--prompt-len={PROMPT_LEN}",
        f"--new-tokens={NEW_TOKENS}",
        "--target-batch-sizes=3",
        "--rank=4",
        "--threads=1",
        "--floor-repeats=2",
        "--repeats=2",  # engine and server alternate, twice each; the median run is kept
        "--overlap-steps",  # the server path with the router's steps overlapped: the same tokens
        f"--output={tmp / 'out.json'}",
        f"--workdir={tmp / 'work'}",
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads((tmp / "out.json").read_text()), tmp, out.getvalue()


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def test_every_path_is_measured_for_every_batch_and_workload(bench: tuple[dict, Path, str]) -> None:
    doc, tmp, stdout = bench
    rows = doc["rows"]
    assert [(r["batch_size"], r["workload"]) for r in rows] == [
        (b, w) for b in BATCH_SIZES for w in WORKLOADS
    ]
    for r in rows:
        for key in (
            "floor_tokens_per_s",
            "engine_tokens_per_s",
            "engine_decode_tokens_per_s",
            "server_tokens_per_s",
            "hf_tokens_per_s",
        ):
            assert _positive(r[key]), (key, r)
        assert r["engine_vs_hf"] == pytest.approx(r["engine_tokens_per_s"] / r["hf_tokens_per_s"])
        assert r["server_vs_engine"] == pytest.approx(r["server_tokens_per_s"] / r["engine_tokens_per_s"])
        assert r["server"]["prompt_tokens"] == [PROMPT_LEN]  # the server tokenized the text as we did
        for path in ("engine", "server"):  # each repeat ran, and gave the same greedy tokens
            assert len(r[path]["repeat_tokens_per_s"]) == 2 and r[path]["repeats_equal"] is True, (path, r)
            assert r[f"{path}_tokens_per_s"] == pytest.approx(min(r[path]["repeat_tokens_per_s"]))
    by = {(r["batch_size"], r["workload"]): r for r in rows}
    assert by[(3, "uniform-2")]["distinct_adapters"] == 2 and by[(1, "uniform-2")]["distinct_adapters"] == 1
    assert by[(3, "base")]["engine_vs_base"] == 1.0
    assert [f["batch_size"] for f in doc["floor"]] == list(BATCH_SIZES)
    # the same matmuls on packed weights, as the engine runs them (this CPU build packs fp32)
    assert [f["batch_size"] for f in doc["packed_floor"]] == list(BATCH_SIZES)
    assert all(_positive(r["packed_floor_tokens_per_s"]) for r in rows)
    for r in rows:  # the target's floor is the faster layout's
        best = max(r["floor_tokens_per_s"], r["packed_floor_tokens_per_s"])
        assert r["engine_decode_vs_best_floor"] == pytest.approx(r["engine_decode_tokens_per_s"] / best)
    assert "uniform-2" in stdout and "targets" in stdout
    png = (tmp / "out.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_all_paths_generate_the_same_greedy_tokens(bench: tuple[dict, Path, str]) -> None:
    doc, _, _ = bench
    for r in doc["rows"]:
        row0 = r["row0"]
        assert len(row0["prompt"]) == PROMPT_LEN
        assert len(row0["engine"]) == NEW_TOKENS
        assert row0["engine"] == row0["hf"] == row0["server"], r["workload"]
        assert r["engine_rows_equal_hf"] == r["server_rows_equal_engine"] == r["batch_size"]
    by = {(r["batch_size"], r["workload"]): r["row0"]["engine"] for r in doc["rows"]}
    assert by[(3, "single")] != by[(3, "base")], "the adapter changes the output"


def test_targets_machine_and_threads_are_recorded(bench: tuple[dict, Path, str]) -> None:
    doc, _, _ = bench
    targets = doc["targets"]
    assert {t["batch_size"] for t in targets} == {3}
    names = {(t["target"], t["path"]) for t in targets}
    assert ("base >= 0.8x matmul floor (decode; the faster of plain and packed)", "engine") in names
    assert ("uniform-2 >= 4x HF + PEFT", "server") in names
    for t in targets:
        assert isinstance(t["met"], bool) and t["met"] == (t["ratio"] >= t["threshold"])
    assert doc["machine"]["cpu_count"] >= 1 and doc["machine"]["cpu_model"]
    assert doc["threads"]["floor_engine_hf_torch_threads"] == 1
    assert doc["threads"]["server_worker_threads_requested"] is None  # the launcher chose
    launcher_split = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
    assert doc["threads"]["server_worker_threads"] == launcher_split  # as the worker logged it
    assert set(doc["load_average"]) == {"start", "end"}
    assert doc["config"]["overlap_steps"] is True


def test_bad_flags_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "--adapter-counts=1"]) == 2
    assert "single" in capsys.readouterr().err
    assert main(["model", "--paths=engine,gpu"]) == 2
    assert "unknown paths" in capsys.readouterr().err
    # --dtype and --quantize are lorax-worker's own flags, with its checks (proto/worker_settings.py)
    assert main(["model", "--dtype=float16"]) == 2
    assert "runs float32 or bfloat16 on CPU" in capsys.readouterr().err
    assert main(["model", "--dtype=fp64"]) == 2
    assert "--dtype must be auto or one of" in capsys.readouterr().err
    assert main(["model", "--quantize=int3", "--paths=engine"]) == 2
    assert "int3" in capsys.readouterr().err


def test_dtype_and_quantize_come_from_the_workers_declaration(monkeypatch: pytest.MonkeyPatch) -> None:
    from loraxpy.bench.model_cli import build_model_parser, config_from_args

    assert config_from_args(build_model_parser().parse_args([])).dtype == "float32"  # auto on CPU
    monkeypatch.setenv("DTYPE", "bfloat16")  # the worker's environment variable
    config = config_from_args(build_model_parser().parse_args(["--quantize=fp8", "--paths=engine"]))
    assert (config.dtype, config.quantize) == ("bfloat16", "fp8")


def test_bfloat16_runs_every_in_process_path_in_bf16(tmp_path: Path) -> None:
    model = write_random_model(SHAPES["tiny"], tmp_path / "tiny", torch.float32, seed=3)
    write_word_tokenizer(model, SHAPES["tiny"].vocab_size)
    argv = [
        "model", f"--model-id={model}", "--batch-sizes=2", "--adapter-counts=2", "--prompt-len=4",
        "--new-tokens=2", "--target-batch-sizes=2", "--rank=4", "--threads=1", "--floor-repeats=1",
        "--paths=floor,engine,hf", "--dtype=bfloat16",
        f"--output={tmp_path / 'out.json'}", f"--workdir={tmp_path / 'work'}",
    ]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["config"]["dtype"] == "bfloat16"
    assert doc["floor"][0]["weight_bytes"] == sum(2 * o * i for o, i in linear_shapes(SHAPES["tiny"]))
    for row in doc["rows"]:
        assert _positive(row["engine_tokens_per_s"]) and _positive(row["hf_tokens_per_s"])
