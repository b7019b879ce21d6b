"""The startup self-check on CPU: injected failing fast paths fall back to their twins, good ones stay.

On CUDA the runner checks Triton attention, Triton SGMV and the captured decode graphs at warmup;
here the same checks run with `is_enabled` forced on, against kernels broken on purpose (a wrong
result, a compile error) and against the real Triton kernels in Triton's interpreter.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from loraxpy.kernels.attention import (
    AttentionBackend,
    paged_attention_reference,
    paged_attention_sdpa,
    store_kv,
)
from loraxpy.proto import worker_pb2 as pb
from loraxpy.worker import self_check_cases
from loraxpy.worker.batch import NewRequestData, StepInput
from loraxpy.worker.layers import Shard
from loraxpy.worker.lora import LoraManager
from loraxpy.worker.model import CausalLM
from loraxpy.worker.model_config import ModelConfig
from loraxpy.worker.moe import SparseMoeBlock
from loraxpy.worker.runner import ModelRunner, RunnerOptions
from loraxpy.worker.sampling import SamplingParams
from loraxpy.worker.self_check import (
    SelfCheck,
    active_paths,
    attention_of,
    compare,
    experts_path,
    packed_path,
    use_attention,
)
from loraxpy.worker.server import WorkerServicer

CPU = torch.device("cpu")
F32 = torch.float32


def _broken_attend(*args: object) -> torch.Tensor:
    out = paged_attention_sdpa(*args)  # type: ignore[arg-type]
    out[-1] += 1.0  # one wrong query row: what a bad mask or tile edge would do
    return out


def _uncompilable(*args: object) -> torch.Tensor:
    raise RuntimeError("CompilationError: out of resource: shared memory, Required: 262144")


BROKEN = AttentionBackend("triton", _broken_attend, store_kv)
UNCOMPILABLE = AttentionBackend("triton", _uncompilable, store_kv)
GOOD = AttentionBackend("triton", paged_attention_reference, store_kv)  # a correct "fast" path


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> ModelConfig:
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama")
    LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    ).save_pretrained(folder)  # fmt: skip
    return ModelConfig.from_folder(Path(folder))


def model_with(config: ModelConfig, attention: AttentionBackend) -> CausalLM:
    return CausalLM(config, shard=Shard(), attention=attention, dtype=F32, device=CPU)


def test_compare_passes_equal_outputs_and_names_every_kind_of_failure() -> None:
    x = torch.randn(8, 4)
    same = lambda: (x.clone(),)  # noqa: E731
    assert compare(same, same, F32) is None
    assert compare(lambda: (x + 1e-7,), same, F32) is None  # rounding, not a bug
    assert "relative error" in (compare(lambda: (x * 1.1,), same, F32) or "")
    assert "relative error" in (compare(lambda: (x.masked_fill(x > 0, float("nan")),), same, F32) or "")
    assert "shape" in (compare(lambda: (x[:4],), same, F32) or "")
    failure = compare(lambda: _uncompilable(), same, F32)
    assert failure is not None and failure.startswith("RuntimeError: CompilationError")


@pytest.mark.parametrize("broken", [BROKEN, UNCOMPILABLE], ids=["wrong-result", "compile-error"])
def test_a_failing_attention_kernel_is_replaced_by_sdpa(
    config: ModelConfig, broken: AttentionBackend, caplog: pytest.LogCaptureFixture
) -> None:
    model = model_with(config, broken)
    check = SelfCheck(is_enabled=True)
    with caplog.at_level(logging.WARNING):
        check.check_kernels(model, None, block_size=16)
    assert attention_of(model).name == "sdpa"
    assert all(layer.self_attn.attention.name == "sdpa" for layer in model.layers)
    assert list(check.failures) == ["attention"]
    assert "triton attention path failed" in caplog.text and "using sdpa instead" in caplog.text


def test_a_correct_fast_path_is_kept_and_nothing_is_checked_on_cpu(config: ModelConfig) -> None:
    model = model_with(config, GOOD)
    check = SelfCheck(is_enabled=True)
    check.check_kernels(model, None, block_size=16)
    assert attention_of(model) is GOOD and check.failures == {}
    cpu_check = SelfCheck.for_device(CPU)  # the torch paths serve CPU: no startup cost at all
    use_attention(model, BROKEN)
    cpu_check.check_kernels(model, None, block_size=16)
    assert attention_of(model) is BROKEN and not cpu_check.is_kernels_checked


def _shrink_dropping_the_last_row(*args: object, **kwargs: object) -> torch.Tensor:
    from loraxpy.kernels.lora_triton import sgmv_shrink

    v = sgmv_shrink(*args, **kwargs)  # type: ignore[arg-type]
    v[-2] = 0  # the last adapter row loses its delta (the very last row is a base row): a tile-edge bug
    return v


def _uncompilable_shrink(*args: object, **kwargs: object) -> torch.Tensor:
    raise RuntimeError("CompilationError: at 12:8: unsupported dtype")


@pytest.mark.parametrize(
    "shrink", [_shrink_dropping_the_last_row, _uncompilable_shrink], ids=["wrong-result", "compile-error"]
)
def test_a_failing_sgmv_kernel_falls_back_to_the_torch_lora_path(
    config: ModelConfig, shrink: object, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("triton", reason="triton is a dev dependency (make install)")
    model = model_with(config, GOOD)
    # chosen on CUDA; here in Triton's interpreter, with a broken shrink
    lora = LoraManager.attach(model, config, Shard(), num_slots=2, max_rank=16, backend="triton")
    monkeypatch.setattr(self_check_cases, "sgmv_shrink", shrink)
    check = SelfCheck(is_enabled=True)
    with caplog.at_level(logging.WARNING):
        check.check_kernels(model, lora, block_size=16)
    assert lora.backend == "torch" and list(check.failures) == ["lora"]
    assert "triton lora path failed" in caplog.text
    assert attention_of(model) is GOOD


def test_the_real_triton_kernels_pass_the_check_in_the_interpreter(config: ModelConfig) -> None:
    """The cases are valid inputs for the real kernels: a false alarm would cost every GPU its speed."""
    pytest.importorskip("triton", reason="triton is a dev dependency (make install)")
    from loraxpy.kernels.attention import select_attention_backend

    model = model_with(config, select_attention_backend(CPU, "triton"))
    lora = LoraManager.attach(model, config, Shard(), num_slots=2, max_rank=16, backend="triton")
    check = SelfCheck(is_enabled=True)
    check.check_kernels(model, lora, block_size=16)
    assert check.failures == {}
    assert attention_of(model).name == "triton" and lora.backend == "triton"


class FakeGraphs:
    """What the graph check uses of DecodeGraphs; `replay` stands in for the captured graphs."""

    def __init__(self, runner: ModelRunner, replay_error: float) -> None:
        self.real = runner.graphs
        assert self.real is not None
        self.is_captured = True
        self.buckets = self.real.buckets
        self.max_model_len = self.real.max_model_len
        self.replay_error = replay_error

    def run(self, plan, token_adapter_indices):  # type: ignore[no-untyped-def]
        hidden = self.real.run(plan, token_adapter_indices)  # the padded eager twin on CPU
        return hidden + self.replay_error if self.is_captured else hidden


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize(("replay_error", "kept"), [(0.0, True), (0.5, False)])
def test_decode_graphs_that_differ_from_eager_are_dropped(
    model_path: Path, replay_error: float, kept: bool
) -> None:
    pytest.importorskip("triton", reason="triton is a dev dependency (make install)")
    options = RunnerOptions(
        dtype=F32, device=CPU, attention_backend="triton", cuda_graph_max_batch_size=4, max_loras=0
    )
    runner = ModelRunner(model_path, options)
    runner.warmup(max_prefill_tokens=64, max_num_seqs=4, num_blocks=8)
    fake = FakeGraphs(runner, replay_error)
    check = SelfCheck(is_enabled=True)
    graphs = check.check_graphs(fake, runner.kv_caches, 16, runner.config.vocab_size)  # type: ignore[arg-type]
    assert (graphs is fake) == kept
    assert ("decode" in check.failures) != kept


def test_a_runner_whose_attention_fails_the_check_serves_the_same_tokens_through_sdpa(
    model_path: Path,
) -> None:
    """The warmup hook: the fallback happens before profiling, Info's paths say so, tokens are right."""
    tokens = {}
    for name, attention in (("sdpa", None), ("broken", BROKEN)):
        runner = ModelRunner(model_path, RunnerOptions(dtype=F32, device=CPU, max_loras=0))
        if attention is not None:
            use_attention(runner.model, attention)
            runner.attention_backend = attention.name
            runner.self_check.is_enabled = True  # as on CUDA
        runner.warmup(max_prefill_tokens=64, max_num_seqs=4, num_blocks=16)
        info = WorkerServicer(runner, None).Info(pb.InfoRequest(), None)  # type: ignore[arg-type]
        assert dict(info.kernel_paths) == {
            "attention": "sdpa",
            "lora": "none",
            "decode": "eager",
            "cpu_ops": runner.cpu_ops,  # fused (kernels/cpu_fused.cpp) where it builds, else torch
        }
        assert info.attention_backend == "sdpa"
        assert list(info.self_check_failures) == ([] if attention is None else ["attention"])
        new = NewRequestData(1, (5, 9, 2, 33, 7), 5, SamplingParams(), 0, (0,), 5)
        out = runner.step(StepInput(new_requests=(new,)))
        tokens[name] = out[0].token
    assert tokens["broken"] == tokens["sdpa"]


def test_the_router_reports_each_path_and_marks_shards_that_differ() -> None:
    from prometheus_client import generate_latest

    from loraxpy.router.metrics import Metrics
    from loraxpy.router.worker_client import merge_kernel_paths

    same = {"attention": "triton", "lora": "triton", "decode": "cuda-graphs"}
    assert merge_kernel_paths([same, same]) == same
    fell_back = {**same, "attention": "sdpa"}
    merged = merge_kernel_paths([same, fell_back])
    assert merged == {**same, "attention": "mixed: sdpa, triton"}
    metrics = Metrics()
    metrics.set_kernel_paths(merged)
    text = generate_latest(metrics.registry).decode()
    assert 'lorax_kernel_path{implementation="cuda-graphs",path="decode"} 1.0' in text


@pytest.fixture(scope="module")
def moe_config(tmp_path_factory: pytest.TempPathFactory) -> ModelConfig:
    from transformers import MixtralConfig

    folder = tmp_path_factory.mktemp("mixtral")
    MixtralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
    ).save_pretrained(folder)  # fmt: skip
    return ModelConfig.from_folder(Path(folder))


def moe_model_on_triton(moe_config: ModelConfig) -> CausalLM:
    """A random Mixtral whose experts are set to the Triton path (chosen on CUDA; here the interpreter)."""
    model = model_with(moe_config, GOOD)
    gen = torch.Generator().manual_seed(0)
    for param in model.parameters():
        param.data.normal_(0.0, 0.2, generator=gen)
    for block in model.modules():
        if isinstance(block, SparseMoeBlock):
            block.experts.use_triton = True
    return model


def _experts_path(model: CausalLM) -> set[bool]:
    return {m.experts.use_triton for m in model.modules() if isinstance(m, SparseMoeBlock)}


def _experts_dropping_a_row(*args: object) -> torch.Tensor:
    from loraxpy.kernels.moe_triton import grouped_experts

    out = grouped_experts(*args)  # type: ignore[arg-type]
    out[-1] = 0  # the last token loses its experts: a row-block edge bug
    return out


@pytest.mark.parametrize(
    "grouped", [_experts_dropping_a_row, _uncompilable], ids=["wrong-result", "compile-error"]
)
def test_failing_grouped_experts_fall_back_to_the_torch_experts(
    moe_config: ModelConfig,
    grouped: object,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("triton", reason="triton is a dev dependency (make install)")
    model = moe_model_on_triton(moe_config)
    monkeypatch.setattr(self_check_cases, "grouped_experts", grouped)
    check = SelfCheck(is_enabled=True)
    with caplog.at_level(logging.WARNING):
        check.check_kernels(model, None, block_size=16)
    assert _experts_path(model) == {False} and list(check.failures) == ["experts"]
    assert experts_path(model) == "torch"
    assert "triton experts path failed" in caplog.text


def test_the_real_grouped_experts_pass_the_check_in_the_interpreter(
    moe_config: ModelConfig, config: ModelConfig
) -> None:
    pytest.importorskip("triton", reason="triton is a dev dependency (make install)")
    model = moe_model_on_triton(moe_config)
    check = SelfCheck(is_enabled=True)
    check.check_kernels(model, None, block_size=16)
    assert check.failures == {} and _experts_path(model) == {True}
    assert active_paths("triton", None, None, experts=experts_path(model))["experts"] == "triton"
    assert "experts" not in active_paths("triton", None, None, experts=experts_path(model_with(config, GOOD)))


def packed_model_on_triton(config: ModelConfig) -> CausalLM:
    """A random Llama whose decoder linears are 4-bit GPTQ-style integers (groups of 32) set to the
    Triton w4a16 kernel (chosen on CUDA; here the interpreter)."""
    from loraxpy.worker.gptq import PackedLinear, PackedWeight
    from loraxpy.worker.layers import ColumnParallelLinear, RowParallelLinear

    model = model_with(config, GOOD)
    gen = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if name.startswith("layers.") and isinstance(module, ColumnParallelLinear | RowParallelLinear):
            out_features, in_features = module.weight.shape
            groups = -(-in_features // 32)
            ints = torch.randint(0, 16, (in_features, out_features), generator=gen)
            zeros = torch.randint(0, 16, (groups, out_features), generator=gen).float()
            scales = torch.rand(groups, out_features, generator=gen) * 0.02
            part = PackedWeight(4, ints, zeros, scales, torch.arange(in_features) // 32)
            module.quant = PackedLinear([part])
            module.quant.use_triton = True
    return model


def _packed_paths(model: CausalLM) -> list[bool]:
    from loraxpy.worker.gptq import PackedLinear

    return [
        m.quant.use_triton for m in model.modules() if isinstance(getattr(m, "quant", None), PackedLinear)
    ]


def test_the_real_w4a16_kernel_passes_the_check_in_the_interpreter(config: ModelConfig) -> None:
    pytest.importorskip("triton", reason="triton is a dev dependency (make install)")
    model = packed_model_on_triton(config)
    check = SelfCheck(is_enabled=True)
    check.check_kernels(model, None, block_size=16)
    assert check.failures == {} and _packed_paths(model) == [True] * 8  # 4 linears a layer, 2 layers
    assert packed_path(model) == {"w4a16": "triton"} and packed_path(model_with(config, GOOD)) == {}


def test_a_failing_w4a16_kernel_falls_back_to_dequantize_then_matmul(
    config: ModelConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("triton", reason="triton is a dev dependency (make install)")
    from loraxpy.kernels import w4a16_triton

    real = w4a16_triton.w4a16_matmul

    def dropping_the_last_group(*args: object, **kwargs: object) -> torch.Tensor:
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        out[36:] = 0  # a prefill step's last row block lost: a tile edge bug
        return out

    model = packed_model_on_triton(config)
    monkeypatch.setattr(w4a16_triton, "w4a16_matmul", dropping_the_last_group)
    check = SelfCheck(is_enabled=True)
    with caplog.at_level(logging.WARNING):
        check.check_kernels(model, None, block_size=16)
    assert _packed_paths(model) == [False] * 8 and list(check.failures) == ["w4a16"]
    assert "triton w4a16 path failed" in caplog.text and packed_path(model) == {"w4a16": "torch"}
