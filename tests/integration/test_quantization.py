"""--quantize: the quantized worker's greedy tokens equal an independent reference running the same
quantized weights (HF transformers + PEFT), with mixed adapters, over one and two shards; misuse is
refused at startup."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIGS, build_tiny_model
from prequantized import reference_weights, write_checkpoint, write_fp8_checkpoint
from test_worker_lora import INDEX, load, make_adapters
from tiny_gguf import write_tiny_llama_gguf
from worker_driver import Driver, Request, sharded_workers

from loraxpy.bench.model_suite import ModelBenchConfig
from loraxpy.proto import worker_pb2 as pb
from loraxpy.proto import worker_pb2_grpc
from loraxpy.proto.quantization import check_scheme_name
from loraxpy.router.config import RouterConfig
from loraxpy.worker.config import parse_args
from loraxpy.worker.quantization import check_quantization
from loraxpy.worker.runner import ModelRunner, RunnerOptions

pytestmark = pytest.mark.slow

ROW_PARALLEL = ("o_proj", "down_proj")  # input columns split over ranks: each rank's slice has its own scales
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NAMES = [None, *INDEX]
# computed once per module: HF + PEFT's greedy answers by scheme (or unquantized)
REFERENCE: dict[str, list[tuple[list[int], list[float]]]] = {}


def fp8_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """e4m3 with one scale per output row, the row's max mapped to e4m3's largest value (448)."""
    scale = w.abs().amax(dim=1, keepdim=True) / 448.0
    scale[scale == 0] = 1.0
    return (w / scale).to(torch.float8_e4m3fn).float() * scale


def per_shard(roundtrip: Callable[[torch.Tensor], torch.Tensor], world_size: int) -> Callable:
    """The weights each of `world_size` shards holds after quantizing its own slice, put back together."""

    def apply(name: str, w: torch.Tensor) -> torch.Tensor:
        if name.split(".")[-1] in ROW_PARALLEL:
            return torch.cat([roundtrip(part) for part in w.chunk(world_size, dim=1)], dim=1)
        return roundtrip(w)

    return apply


def reference_greedy(
    base: Path,
    root: Path,
    requests: list[Request],
    quantized: Callable[[str, torch.Tensor], torch.Tensor],
    n: int,
    e4m3_kv: bool = False,
) -> list[tuple[list[int], list[float]]]:
    """HF transformers whose base linears hold `quantized` weights (and with `e4m3_kv` whose attention
    sees K/V rounded to e4m3), with PEFT's adapters on top: greedy tokens and their log-probabilities
    per request (request i runs adapter NAMES[i])."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register("e4m3_kv_sdpa", e4m3_kv_sdpa)
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, attn_implementation="e4m3_kv_sdpa" if e4m3_kv else None
    )
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if module_name.split(".")[-1] in LINEARS:
                module.weight.copy_(quantized(module_name, module.weight.float()))
    return peft_greedy(model, root, requests, n)


def unquantized_reference(base: Path, root: Path, batch: list[Request]) -> list[float]:
    """The log-probs of the first (base-model) request of run_mixed_batch in full precision, computed
    once: what the tests compare a quantized reference with, to show the quantization matters."""
    if "unquantized" not in REFERENCE:
        REFERENCE["unquantized"] = reference_greedy(base, root, batch[:1], lambda _, w: w, 8)
    return REFERENCE["unquantized"][0][1]


def peft_greedy(
    model: torch.nn.Module, root: Path, requests: list[Request], n: int
) -> list[tuple[list[int], list[float]]]:
    """Every adapter loaded once into one PeftModel; request i runs NAMES[i] (None: adapters disabled)."""
    from peft import PeftModel

    adapters = [name for name in NAMES if name is not None]
    peft = PeftModel.from_pretrained(model, root / adapters[0], adapter_name=adapters[0])
    for name in adapters[1:]:
        peft.load_adapter(root / name, adapter_name=name)
    out = []
    for r, name in zip(requests, NAMES, strict=False):
        if name is None:
            context: contextlib.AbstractContextManager = peft.disable_adapter()
        else:
            peft.set_adapter(name)
            context = contextlib.nullcontext()
        with context:
            result = peft.generate(
                input_ids=torch.tensor([r.prompt]),
                max_new_tokens=n,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        tokens = result.sequences[0, len(r.prompt) :].tolist()
        logprobs = [
            torch.log_softmax(step[0].float(), -1)[t].item()
            for step, t in zip(result.logits, tokens, strict=True)
        ]
        out.append((tokens, logprobs))
    return out


@pytest.fixture(scope="module")
def llama_with_adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from transformers import AutoModelForCausalLM

    base = build_tiny_model("llama", tmp_path_factory.mktemp("quant-llama"))
    root = tmp_path_factory.mktemp("quant-adapters")
    make_adapters(base, root, AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    return base, root


def run_mixed_batch(stubs: list[worker_pb2_grpc.WorkerStub], n: int) -> list[Request]:
    for f in [
        s.Warmup.future(pb.WarmupRequest(max_prefill_tokens=64, max_num_seqs=8, num_blocks=64)) for s in stubs
    ]:
        f.result()
    for name, index in INDEX.items():
        for s in stubs:
            load(s, index, name)
    batch = [
        Request(
            id=i + 1,
            prompt=[3 + i, 14, 15, 92, 65, 35, 7 * i],
            max_new_tokens=n,
            adapter_index=INDEX[m] if m else 0,
        )
        for i, m in enumerate(NAMES)
    ]
    Driver(stubs, num_blocks=64, block_size=16, step_token_budget=64, chunk_size=5).run(batch)
    return batch


# One shard also stores K/V in fp8 (the only one-shard run of --kv-cache-dtype fp8, which runs over
# two alone below): one worker instead of two, CI time; the reference rounds both.
@pytest.mark.parametrize(("num_shard", "kv_fp8"), [(1, True), (2, False)])
def test_fp8_worker_matches_transformers_on_the_same_fp8_weights(
    num_shard: int, kv_fp8: bool, llama_with_adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    base, root = llama_with_adapters
    args = ("--quantize", "fp8", "--adapter-root", str(root))
    kv_args = ("--kv-cache-dtype", "fp8") if kv_fp8 else ()
    with sharded_workers(base, tmp_path, num_shard, extra_args=args + kv_args) as stubs:
        batch = run_mixed_batch(stubs, 8)
        infos = [s.Info(pb.InfoRequest()) for s in stubs]
    checkpoint_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    assert [i.quantize for i in infos] == ["fp8"] * num_shard
    assert all(0 < i.weight_bytes < checkpoint_bytes for i in infos)
    kv = ("float8_e4m3fn", "sdpa-fp8") if kv_fp8 else ("float32", "sdpa")
    assert [(i.kv_cache_dtype, i.attention_backend) for i in infos] == [kv] * num_shard
    expected = reference_greedy(base, root, batch, per_shard(fp8_roundtrip, num_shard), 8, e4m3_kv=kv_fp8)
    for r, (tokens, logprobs) in zip(batch, expected, strict=True):
        assert r.generated == tokens, f"request {r.id}"
        assert r.logprobs == pytest.approx(logprobs, abs=1e-4), f"request {r.id}"
    unquantized = unquantized_reference(base, root, batch)
    assert max(abs(a - b) for a, b in zip(unquantized, expected[0][1], strict=False)) > 1e-3, (
        "fp8 changes the model"
    )
    log = (tmp_path / "shard-0.log").read_text()
    assert "quantized fp8" in log


# Block scales quantized again (double quantization), as LoRAX's bitsandbytes layers keep them.
BNB_CONFIGS = {
    "bitsandbytes": {"load_in_8bit": True},
    "bitsandbytes-nf4": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
    },
    "bitsandbytes-fp4": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": True,
    },
}


def bnb_transformers(base: Path, scheme: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(**BNB_CONFIGS[scheme], bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(
        base, quantization_config=config, device_map="cpu", dtype=torch.float32
    )


@pytest.mark.parametrize("scheme", ["bitsandbytes", "bitsandbytes-nf4"])
def test_bitsandbytes_worker_matches_transformers_bitsandbytes_integration(
    scheme: str, llama_with_adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    """The reference is transformers loading the same checkpoint with its BitsAndBytesConfig, and PEFT on top."""
    pytest.importorskip("bitsandbytes")
    base, root = llama_with_adapters
    args = ("--quantize", scheme, "--adapter-root", str(root))
    with sharded_workers(base, tmp_path, 1, extra_args=args) as stubs:
        batch = run_mixed_batch(stubs, 8)
    expected = peft_greedy(bnb_transformers(base, scheme), root, batch, 8)
    assert [r.generated for r in batch] == [tokens for tokens, _ in expected]


def bnb_4bit_roundtrip(quant_type: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A weight through bitsandbytes' own functional quantize_4bit / dequantize_4bit: blocks of 64
    consecutive values, their absmax scales quantized again (compress_statistics)."""

    def roundtrip(w: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as bnb_functional

        q, state = bnb_functional.quantize_4bit(
            w.contiguous(), blocksize=64, compress_statistics=True, quant_type=quant_type
        )
        return bnb_functional.dequantize_4bit(q, state).float()

    return roundtrip


@pytest.fixture(scope="module")
def wide_llama_with_adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny Llama twice as wide (128 hidden, 256 intermediate), so that each of two shards' slices
    of o_proj and down_proj holds whole blocks of 64 input features (bitsandbytes' CPU 4-bit kernel)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = tmp_path_factory.mktemp("wide-llama")
    spec = {**TINY_CONFIGS["llama"], "hidden_size": 128, "intermediate_size": 256}
    config = AutoConfig.for_model(
        spec.pop("model_type"), **spec, initializer_range=0.1, eos_token_id=None, bos_token_id=None
    )
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.save_pretrained(base)
    root = tmp_path_factory.mktemp("wide-adapters")
    make_adapters(base, root, model)
    return base, root


def sharded_4bit_weights(
    base: Path, roundtrip: Callable[[torch.Tensor], torch.Tensor], world_size: int
) -> dict[str, torch.Tensor]:
    """Module name → the weight `world_size` shards hold between them. Each shard quantizes one tensor
    per layer it keeps: its rows of q, k and v stacked (so gate and up), its columns of o (and down);
    double quantization's statistics (the mean of the block scales, 8-bit scales of 256 scales) run
    over that whole tensor, so the parts are quantized together, as the shard does."""
    from safetensors.torch import load_file

    stored: dict[str, torch.Tensor] = {}
    for f in sorted(base.glob("*.safetensors")):
        stored.update(load_file(f))
    out: dict[str, torch.Tensor] = {}
    layers = sorted({".".join(k.split(".")[:3]) for k in stored if k.startswith("model.layers.")})
    fused = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
    for layer in layers:
        for names in fused:
            ws = [stored[f"{layer}.{n}.weight"].float() for n in names]
            shards = []
            for rank in range(world_size):
                parts = [w.chunk(world_size, dim=0)[rank] for w in ws]
                shards.append(roundtrip(torch.cat(parts)).split([p.shape[0] for p in parts]))
            for i, n in enumerate(names):
                out[f"{layer}.{n}"] = torch.cat([shard[i] for shard in shards])
        for n in ("self_attn.o_proj", "mlp.down_proj"):
            w = stored[f"{layer}.{n}.weight"].float()
            out[f"{layer}.{n}"] = torch.cat([roundtrip(c) for c in w.chunk(world_size, dim=1)], dim=1)
    return out


def test_bitsandbytes_fp4_over_two_shards_matches_the_weights_each_shard_quantized(
    wide_llama_with_adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    """Each shard quantizes its own slice (its q/k/v and gate/up rows, stacked; half of o's and down's
    input columns, whose blocks of 64 differ from the whole weight's); the reference is transformers +
    PEFT holding what bitsandbytes' functional quantize / dequantize make of each shard's tensors
    (`sharded_4bit_weights`): dequantize, then matmul."""
    pytest.importorskip("bitsandbytes")
    base, root = wide_llama_with_adapters
    args = ("--quantize", "bitsandbytes-fp4", "--adapter-root", str(root))
    with sharded_workers(base, tmp_path, 2, extra_args=args) as stubs:
        batch = run_mixed_batch(stubs, 8)
        infos = [s.Info(pb.InfoRequest()) for s in stubs]
    assert [i.quantize for i in infos] == ["bitsandbytes-fp4"] * 2
    weights = sharded_4bit_weights(base, bnb_4bit_roundtrip("fp4"), 2)
    expected = reference_greedy(base, root, batch, lambda name, _: weights[name], 8)
    # Tokens only, as the one-shard test: bitsandbytes' CPU 4-bit kernel rounds x to bf16 before its
    # matmul (0.016 off the fp32 product of the dequantized weight where the outputs reach 4), so
    # log-probabilities differ from an fp32 dequantize-then-matmul by about 1e-2.
    assert [r.generated for r in batch] == [tokens for tokens, _ in expected]
    whole = sharded_4bit_weights(base, bnb_4bit_roundtrip("fp4"), 1)
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"):
        assert not torch.equal(whole[name], weights[name]), (
            f"{name}: the row-parallel slices quantize differently from the whole weight"
        )


def test_bitsandbytes_4bit_slices_the_cpu_kernel_cannot_take_are_refused_at_load(
    llama_with_adapters: tuple[Path, Path],
) -> None:
    """The tiny Llama's o_proj has 64 input features: 32 per shard over two, which bitsandbytes' CPU
    4-bit kernel fails on at the first matmul; the worker refuses it while loading."""
    pytest.importorskip("bitsandbytes")
    from loraxpy.worker.layers import Shard

    base, _ = llama_with_adapters
    options = RunnerOptions(
        dtype=torch.float32, device=torch.device("cpu"), quantize="bitsandbytes-nf4", shard=Shard(1, 2)
    )
    with pytest.raises(
        ValueError, match=r"4-bit CPU kernel takes input features in multiples of 64, and .*o_proj has 32"
    ):
        ModelRunner(base, dataclasses.replace(options, max_loras=0))


FP8_WEIGHTS = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}


def test_worker_refuses_schemes_it_does_not_run_and_disagreeing_checkpoints(tmp_path: Path) -> None:
    for scheme, message in [
        ("hqq-4bit", "not implemented"),
        ("eetq", "CUDA kernels"),
        ("int3", "must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_args(["--listen", "unix:///tmp/x.sock", "--quantize", scheme])
        with pytest.raises(ValueError, match=message):
            RouterConfig(quantize=scheme)
    check_scheme_name(None)
    config = {"model_type": "llama"}
    folder = tmp_path / "model"
    folder.mkdir()
    cpu = torch.device("cpu")
    for stored, flag, message in [
        ({"quant_method": "gptq", "bits": 4}, None, r"quantized \(gptq.*--quantize is not set"),
        (
            {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
            "fp8",
            r"--quantize fp8 disagrees with the checkpoint's quantization_config \(bitsandbytes-nf4\)",
        ),
        (
            {"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": FP8_WEIGHTS}}},
            "bitsandbytes",
            r"disagrees.*\(fp8\)",
        ),
        ({"quant_method": "fp8"}, "fp8", "stored quantized.*fp8 FP8 checkpoints are not read"),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "float-quantized",
                "config_groups": {"g": {"weights": {**FP8_WEIGHTS, "strategy": "block"}}},
            },
            "fp8",
            "strategy 'block' are not read",
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "pack-quantized",
                "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}},
            },
            "gptq",
            r"disagrees.*\(compressed-tensors pack-quantized\)",
        ),
    ]:
        (folder / "config.json").write_text(json.dumps({**config, "quantization_config": stored}))
        with pytest.raises(ValueError, match=message):
            check_quantization(folder, flag, cpu)
    (folder / "config.json").write_text(json.dumps(config))
    check_quantization(folder, "fp8", cpu)


def test_the_runner_refuses_a_disagreeing_checkpoint_before_loading_it(
    llama_with_adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    base, _ = llama_with_adapters
    folder = tmp_path / "int8-checkpoint"
    folder.mkdir()
    for f in base.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "config.json").unlink()
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    options = RunnerOptions(dtype=torch.float32, device=torch.device("cpu"), quantize="fp8")
    with pytest.raises(
        ValueError, match=r"disagrees with the checkpoint's quantization_config \(bitsandbytes\)"
    ):
        ModelRunner(folder, options)


def test_lorax_bench_model_times_a_quantized_engine_only() -> None:
    from loraxpy.bench import model_cli

    def config(*argv: str) -> ModelBenchConfig:
        return model_cli.config_from_args(model_cli.build_model_parser().parse_args(list(argv)))

    assert config("--quantize", "fp8", "--paths", "engine").quantize == "fp8"
    with pytest.raises(ValueError, match="--quantize times the engine only"):
        config("--quantize", "fp8")


def test_fp8_table_lookup_dequantizes_as_torchs_own_conversion() -> None:
    from loraxpy.worker.quantization import Fp8Linear

    w = torch.randn(300, 77, generator=torch.Generator().manual_seed(0))
    w[5] = 0  # an all-zero row keeps scale 1
    layer = Fp8Linear(w)
    assert torch.equal(layer.dequantize(), layer.qweight.float() * layer.scale)
    assert torch.equal(layer.dequantize(), fp8_roundtrip(w))


# Pre-quantized checkpoints (--quantize gptq | awq): GPTQ with act-order (g_idx not in row order), so
# that a row-parallel shard's rows reach groups out of order; AWQ with its column order.
PREQUANTIZED = {"gptq": dict(group_size=16, desc_act=True), "awq": dict(group_size=32)}


@pytest.fixture(scope="module")
def prequantized(
    llama_with_adapters: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    base, _ = llama_with_adapters
    return {
        method: write_checkpoint(base, tmp_path_factory.mktemp(f"quant-{method}"), method, **kwargs)
        for method, kwargs in PREQUANTIZED.items()
    }


@pytest.mark.parametrize("num_shard", [1, 2])
@pytest.mark.parametrize("method", sorted(PREQUANTIZED))
def test_prequantized_worker_matches_transformers_on_the_checkpoints_dequantized_weights(
    method: str,
    num_shard: int,
    llama_with_adapters: tuple[Path, Path],
    prequantized: dict[str, Path],
    tmp_path: Path,
) -> None:
    """The reference is HF transformers + PEFT whose base linears hold the weights the checkpoint's
    packed tensors stand for, unpacked by compressed-tensors and dequantized by the formats' formula
    (tests/integration/prequantized.py), not by the server's code."""
    base, root = llama_with_adapters
    checkpoint = prequantized[method]
    args = ("--quantize", method, "--adapter-root", str(root))
    with sharded_workers(checkpoint, tmp_path, num_shard, extra_args=args) as stubs:
        batch = run_mixed_batch(stubs, 8)
        infos = [s.Info(pb.InfoRequest()) for s in stubs]
    assert [i.quantize for i in infos] == [method] * num_shard
    # CPU: kernels/cpu_int4.cpp multiplies from the 4-bit values, but a row-parallel slice of the
    # act-order checkpoint reaches its groups in runs of unequal length, which keep the torch twin
    path = "torch" if PREQUANTIZED[method].get("desc_act") and num_shard > 1 else "cpu"
    assert [i.kernel_paths["w4a16"] for i in infos] == [path] * num_shard
    base_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    assert all(0 < i.weight_bytes < base_bytes for i in infos)
    if method not in REFERENCE:  # the same weights and requests over one and two shards: computed once
        from transformers import AutoModelForCausalLM

        weights = reference_weights(checkpoint)
        assert len(weights) == 2 * len(LINEARS)
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        assert all(
            not torch.allclose(plain.get_submodule(name).weight, w, atol=1e-3) for name, w in weights.items()
        ), f"{method} changes every linear"
        REFERENCE[method] = reference_greedy(base, root, batch, lambda name, _: weights[name], 8)
    for r, (tokens, logprobs) in zip(batch, REFERENCE[method], strict=True):
        assert r.generated == tokens, f"request {r.id}"
        assert r.logprobs == pytest.approx(logprobs, abs=1e-4), f"request {r.id}"
    assert f"--quantize {method}: 8 linears read packed" in (tmp_path / "shard-0.log").read_text()


def test_packed_values_are_read_in_each_formats_documented_order() -> None:
    """GPTQ packs eight input rows into a word, the first in the lowest 4 bits (AutoGPTQ's pack loop:
    qweight[r] |= q[8r + j] << 4j); AWQ packs eight output columns with column AWQ_ORDER[i] in bits
    4i (AutoAWQ's order map 0, 2, 4, 6, 1, 3, 5, 7). Here each value is its own row / column index."""
    from loraxpy.worker.gptq import unpack_columns, unpack_rows

    word = torch.tensor([[0x76543210]], dtype=torch.int64).to(torch.int32)
    assert unpack_rows(word, 4).flatten().tolist() == list(range(8))
    awq_word = torch.tensor([[0x75316420]], dtype=torch.int64).to(torch.int32)
    assert unpack_columns(awq_word, 4, (0, 2, 4, 6, 1, 3, 5, 7)).flatten().tolist() == list(range(8))
    high = torch.tensor([[0xF0000000 - 2**32]], dtype=torch.int32)  # the sign bit set: still 15, not -1
    assert unpack_rows(high, 4).flatten().tolist() == [0] * 7 + [15]


def test_prequantized_misuse_is_refused_at_startup(
    llama_with_adapters: tuple[Path, Path], prequantized: dict[str, Path], tmp_path: Path
) -> None:
    base, _ = llama_with_adapters
    cpu = torch.device("cpu")
    with pytest.raises(
        ValueError, match=r"--quantize gptq reads a pre-quantized GPTQ checkpoint, but this one"
    ):
        check_quantization(base, "gptq", cpu)
    with pytest.raises(
        ValueError, match=r"--quantize awq disagrees with the checkpoint's quantization_config \(gptq\)"
    ):
        check_quantization(prequantized["gptq"], "awq", cpu)
    with pytest.raises(ValueError, match=r"quantized \(awq.*--quantize is not set"):
        check_quantization(prequantized["awq"], None, cpu)
    folder = tmp_path / "model"
    folder.mkdir()
    for stored, message in [
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "3-bit weights are not read"),
        ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "version 'gemv' is not read"),
        ({"quant_method": "awq", "bits": 4, "zero_point": False}, "zero_point false"),
    ]:
        (folder / "config.json").write_text(
            json.dumps({"model_type": "llama", "quantization_config": stored})
        )
        with pytest.raises(ValueError, match=message):
            check_quantization(folder, stored["quant_method"], cpu)


def test_a_row_parallel_cut_through_a_quantization_group_is_refused(
    llama_with_adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    """Groups of 64 input rows without act-order: o_proj's 64 inputs split over two shards cut its one
    group in half. Act-order checkpoints are sliced by g_idx instead (the served test above)."""
    from loraxpy.worker.layers import Shard

    base, _ = llama_with_adapters
    checkpoint = write_checkpoint(base, tmp_path / "gptq-64", "gptq", group_size=64)
    options = RunnerOptions(
        dtype=torch.float32, device=torch.device("cpu"), quantize="gptq", shard=Shard(1, 2), max_loras=0
    )
    with pytest.raises(
        ValueError, match=r"o_proj: 32 input rows per shard do not hold whole quantization groups of 64"
    ):
        ModelRunner(checkpoint, options)
    ModelRunner(checkpoint, dataclasses.replace(options, shard=Shard(0, 1)))  # one shard reads it
    # Groups of 48: the last group of o_proj's 64 inputs (and down_proj's 128) is shorter, as GPTQ
    # and AWQ write it; one shard reads every row with its own group's scale and zero.
    for method in ("gptq", "awq"):
        checkpoint = write_checkpoint(base, tmp_path / f"{method}-48", method, group_size=48)
        runner = ModelRunner(checkpoint, dataclasses.replace(options, quantize=method, shard=Shard(0, 1)))
        weights = reference_weights(checkpoint)
        for i, layer in enumerate(runner.model.layers):
            for module, name in (
                (layer.self_attn.o_proj, "self_attn.o_proj"),
                (layer.mlp.down_proj, "mlp.down_proj"),
            ):
                assert torch.equal(module.quant.dequantize(), weights[f"model.layers.{i}.{name}"]), (
                    method,
                    name,
                )


@pytest.mark.parametrize(("preset", "num_shard"), [("FP8_DYNAMIC", 1), ("FP8", 2)])
def test_compressed_tensors_fp8_checkpoint_is_served_as_transformers_reads_it(
    preset: str, num_shard: int, llama_with_adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    """A compressed-tensors FP8 checkpoint (scales per channel, over one shard; per tensor, q/k/v each
    with its own, over two) read as stored. The reference is transformers loading the same checkpoint
    through its compressed-tensors integration (dequantized weights; the server, too, leaves the
    activations in full precision), with PEFT's adapters on top."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    base, root = llama_with_adapters
    checkpoint = write_fp8_checkpoint(base, tmp_path / preset, preset)
    args = ("--quantize", "fp8", "--adapter-root", str(root))
    with sharded_workers(checkpoint, tmp_path, num_shard, extra_args=args) as stubs:
        batch = run_mixed_batch(stubs, 8)
        infos = [s.Info(pb.InfoRequest()) for s in stubs]
    assert [i.quantize for i in infos] == ["fp8"] * num_shard
    reference = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    name = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(reference.get_submodule(name).weight, plain.get_submodule(name).weight), "fp8"
    expected = peft_greedy(reference, root, batch, 8)
    for r, (tokens, logprobs) in zip(batch, expected, strict=True):
        assert r.generated == tokens, f"request {r.id}"
        assert r.logprobs == pytest.approx(logprobs, abs=1e-4), f"request {r.id}"
    log = (tmp_path / "shard-0.log").read_text()
    assert "--quantize fp8: 8 linears read as stored (e4m3, compressed-tensors)" in log
    assert ("activation scales not applied" in log) == (preset == "FP8")


@pytest.fixture(scope="module")
def gguf_with_adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.nn.Module]:
    """The tiny GGUF file, transformers' model of it (its own GGUF loading: the gguf package's
    dequantized blocks), and test_worker_lora's PEFT adapters made over that model (the head's
    adapter carries the file's own head, as PEFT saves it)."""
    from transformers import AutoModelForCausalLM

    path = write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.gguf")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    root = tmp_path_factory.mktemp("gguf-adapters")
    make_adapters(path.parent, root, model)
    return path, root, model


def test_gguf_over_two_shards_matches_transformers_gguf_loading(
    gguf_with_adapters: tuple[Path, Path, torch.nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GGUF file of the tiny Llama's shapes (tests/integration/tiny_gguf.py: Q4_1 attention, Q4_0
    gate/up, Q8_0 down and head) over two shards: each takes its rows of q/k/v and gate/up, and whole
    blocks of o's and down's input columns (o: one block of 32 each). The reference is transformers
    loading the same file through its own GGUF integration, with PEFT's adapters on top."""
    tiny_gguf, root, reference = gguf_with_adapters
    monkeypatch.setenv("LORAX_CACHE", str(tmp_path / "cache"))  # where the file's config and tokenizer go
    with sharded_workers(tiny_gguf, tmp_path, 2, extra_args=("--adapter-root", str(root))) as stubs:
        batch = run_mixed_batch(stubs, 8)
        infos = [s.Info(pb.InfoRequest()) for s in stubs]
    assert [i.quantize for i in infos] == ["gguf"] * 2
    expected = peft_greedy(copy.deepcopy(reference), root, batch, 8)
    for r, (tokens, logprobs) in zip(batch, expected, strict=True):
        assert r.generated == tokens, f"request {r.id}"
        assert r.logprobs == pytest.approx(logprobs, abs=1e-4), f"request {r.id}"
    assert len({tuple(r.generated) for r in batch}) == len(batch), "the adapters change the tokens"
    log = (tmp_path / "shard-1.log").read_text()
    assert "linear tensors kept in their GGUF blocks: {'Q4_1': 8, 'Q4_0': 4, 'Q8_0': 2}" in log


def e4m3_kv_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' own SDPA attention over the cached K/V rounded to e4m3 (clamped to ±448) by torch:
    what a cache that stores e4m3 (scale 1) hands attention back."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def e4m3(x: torch.Tensor) -> torch.Tensor:
        return x.float().clamp(-448, 448).to(torch.float8_e4m3fn).to(x.dtype)

    return sdpa_attention_forward(module, query, e4m3(key), e4m3(value), attention_mask, **kwargs)  # type: ignore[arg-type]


# Two shards here, each holding half the KV heads; one shard stores fp8 K/V beside fp8 weights in
# test_fp8_worker_matches_transformers_on_the_same_fp8_weights (CI time: one worker for both).
@pytest.mark.parametrize("num_shard", [2])
def test_fp8_kv_cache_worker_matches_transformers_attending_over_e4m3_kv(
    num_shard: int, llama_with_adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    """--kv-cache-dtype fp8 with mixed adapters (and chunked prefill reading back its own e4m3 K/V):
    the same greedy tokens as HF transformers + PEFT whose attention sees K/V rounded to e4m3."""
    base, root = llama_with_adapters
    args = ("--kv-cache-dtype", "fp8", "--adapter-root", str(root))
    with sharded_workers(base, tmp_path, num_shard, extra_args=args) as stubs:
        batch = run_mixed_batch(stubs, 8)
        infos = [s.Info(pb.InfoRequest()) for s in stubs]
    assert [i.attention_backend for i in infos] == ["sdpa-fp8"] * num_shard
    # warmup asked for 64 blocks: in their bytes float32 K/V would fit 16
    assert [(i.kv_cache_dtype, i.kv_blocks_freed) for i in infos] == [("float8_e4m3fn", 48)] * num_shard
    if "fp8-kv" not in REFERENCE:
        REFERENCE["fp8-kv"] = reference_greedy(base, root, batch, lambda _, w: w, 8, e4m3_kv=True)
    for r, (tokens, logprobs) in zip(batch, REFERENCE["fp8-kv"], strict=True):
        assert r.generated == tokens, f"request {r.id}"
        assert r.logprobs == pytest.approx(logprobs, abs=1e-4), f"request {r.id}"
    unrounded = unquantized_reference(base, root, batch)
    assert max(abs(a - b) for a, b in zip(unrounded, REFERENCE["fp8-kv"][0][1], strict=False)) > 1e-5, (
        "e4m3 K/V change the model"
    )
    # warmup asked for 64 blocks: in their bytes float32 K/V would fit 16
    assert (
        "fp8 (e4m3): 48 more blocks than torch.float32 in these bytes"
        in (tmp_path / "shard-0.log").read_text()
    )
