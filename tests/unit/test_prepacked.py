"""CPU linears packed once for oneDNN against their twin, F.linear, and the whole model either way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loraxpy.kernels.attention import select_attention_backend
from loraxpy.worker import prepacked
from loraxpy.worker.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, Shard
from loraxpy.worker.model import CausalLM
from loraxpy.worker.model_config import ModelConfig
from loraxpy.worker.prepacked import (
    PACKED_MAX_ROWS,
    PACKED_MIN_ROWS,
    PrepackedLinear,
    RowRanges,
    measure_row_ranges,
    padded_rows,
    prepack_model,
    prepack_supported,
)

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(
    prepack_supported(CPU, torch.float32) is not None, reason="this PyTorch build cannot pack for oneDNN"
)


@pytest.mark.parametrize("rows", [1, 3, 4, 7, 16, 32, 33, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_linear_equals_f_linear_at_any_row_count(rows: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(72, 56, generator=gen) / 56**0.5
    b = torch.randn(72, generator=gen) if bias else None
    x = torch.randn(rows, 2 * 56, generator=gen)[:, ::2]  # a strided input, as a sliced activation is
    got = PrepackedLinear(weight)(x, b)
    torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    # with the plain weight kept, steps of 1-3 rows and of more than 32 take it: F.linear's result
    beside = PrepackedLinear(weight, plain=True)(x, b)
    plain_rows = not PACKED_MIN_ROWS <= rows <= PACKED_MAX_ROWS
    assert torch.equal(beside, F.linear(x, weight, b) if plain_rows else got)


def test_packed_weights_alone_meet_a_bounded_number_of_row_counts() -> None:
    """Steps of more than 32 rows are padded (packed weights alone) to 8 sizes per doubling: a
    server's arbitrary prefill lengths up to 8192 tokens make 64 shapes, each at most 1/8 padding."""
    sizes = {padded_rows(r) for r in range(PACKED_MAX_ROWS + 1, 8193)}
    assert len(sizes) == 64
    assert all(padded_rows(r) == r for r in range(1, PACKED_MAX_ROWS + 1))
    assert all(r <= padded_rows(r) <= r * 9 / 8 for r in range(1, 8193))


@pytest.mark.parametrize("rows", [9, 45])  # 45: padded to 48 rows
def test_a_bf16_packed_linear_stays_within_bf16_rounding(rows: int) -> None:
    if prepack_supported(CPU, torch.bfloat16) is not None:
        pytest.skip("no bf16 packing on this CPU")
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(64, 48, generator=gen), torch.randn(rows, 48, generator=gen)
    got = PrepackedLinear(weight.bfloat16())(x.bfloat16(), None).float()
    torch.testing.assert_close(got, F.linear(x, weight), rtol=3e-2, atol=6e-2)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> ModelConfig:
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama")
    LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    ).save_pretrained(folder)  # fmt: skip
    return ModelConfig.from_folder(Path(folder))


def _model(config: ModelConfig) -> CausalLM:
    model = CausalLM(
        config, shard=Shard(), attention=select_attention_backend(CPU), dtype=torch.float32, device=CPU
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.fixture
def xeon_ranges(monkeypatch: pytest.MonkeyPatch) -> RowRanges:
    """`auto`'s measurement as on the Xeon: plain for 1-3 rows and more than 32."""
    ranges = RowRanges()
    monkeypatch.setattr(prepacked, "measure_row_ranges", lambda linears: (ranges, {1: (0.03, 0.045)}))
    return ranges


@pytest.mark.parametrize("layout", ["auto", "packed"])
def test_packing_a_model_replaces_every_linear_and_keeps_the_heads_rows(
    config: ModelConfig, layout: str, xeon_ranges: RowRanges
) -> None:
    model = _model(config)
    plain = {name: m.weight.detach().clone() for name, m in model.named_modules() if hasattr(m, "quant")}
    table = model.embed_tokens.weight.detach().clone()
    packed_bytes = prepack_model(model, layout, CPU, torch.float32)
    linears = [m for m in model.modules() if isinstance(m, ColumnParallelLinear | RowParallelLinear)]
    assert len(linears) == 4 * config.num_layers and all(
        isinstance(m.quant, PrepackedLinear) for m in linears
    )
    if layout == "auto":  # the plain weights stay, for the step sizes they multiply faster
        assert all(torch.equal(m.weight, plain[name]) for name, m in model.named_modules() if m in linears)
        assert all(m.quant.plain.data_ptr() == m.weight.data_ptr() for m in linears)  # the same, no copy
        assert all(m.quant.ranges == xeon_ranges for m in linears)
    else:  # the plain copies are gone (an expanded zero keeps shape and dtype for the adapter slots)...
        assert all(m.weight.untyped_storage().nbytes() <= 4 for m in linears)
    assert all(m.weight.shape == plain[name].shape for name, m in model.named_modules() if m in linears)
    # ...but the tied head's table still embeds, and its packed copy computes the same logits
    head = model.lm_head
    assert isinstance(head, ParallelLMHead) and isinstance(head.quant, PrepackedLinear)
    assert torch.equal(model.embed_tokens.weight, table)
    h = torch.randn(5, config.hidden_size)
    torch.testing.assert_close(head.logits(h), F.linear(h, table), rtol=1e-5, atol=1e-5)
    assert packed_bytes == sum(w.numel() * 4 for w in plain.values())


def test_a_packed_model_computes_the_plain_models_outputs(config: ModelConfig) -> None:
    plain, packed = _model(config), _model(config)
    prepack_model(packed, "packed", CPU, torch.float32)
    x = torch.randn(11, config.hidden_size)
    for a, b in zip(plain.layers, packed.layers, strict=True):
        torch.testing.assert_close(b.mlp(x), a.mlp(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.self_attn.o_proj(x), a.self_attn.o_proj(x), rtol=1e-5, atol=1e-5)


def test_layouts_plain_and_unsupported(config: ModelConfig) -> None:
    model = _model(config)
    assert prepack_model(model, "plain", CPU, torch.float32) == 0
    assert all(getattr(m, "quant", None) is None for m in model.modules())
    assert prepack_supported(CPU, torch.float16) is not None
    assert prepack_model(model, "auto", CPU, torch.float16) == 0  # auto: falls back, says why in the log
    with pytest.raises(ValueError, match="--cpu-weight-layout packed: oneDNN packs float32 and bfloat16"):
        prepack_model(model, "packed", CPU, torch.float16)
    with pytest.raises(ValueError, match="--cpu-weight-layout must be one of"):
        prepack_model(model, "tiles", CPU, torch.float32)


def test_auto_frees_the_plain_weights_where_packed_wins_at_every_size(
    config: ModelConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on the AMD EPYC, where MKL's F.linear is slow: packed at every row count, one copy."""
    monkeypatch.setattr(prepacked, "measure_row_ranges", lambda linears: (RowRanges(1, None), {}))
    model, reference = _model(config), _model(config)
    prepack_model(model, "auto", CPU, torch.float32)
    linears = [m for m in model.modules() if isinstance(m, ColumnParallelLinear | RowParallelLinear)]
    assert all(m.quant.plain is None and m.weight.untyped_storage().nbytes() <= 4 for m in linears)
    x = torch.randn(1, config.hidden_size)  # one row: packed now, the same result within rounding
    torch.testing.assert_close(model.layers[0].mlp(x), reference.layers[0].mlp(x), rtol=1e-5, atol=1e-5)
    assert model.lm_head.quant.ranges == RowRanges(1, None)  # the head's plain rows stay, unused


@pytest.mark.parametrize(
    ("wins", "expected"),
    [
        ({1: False, 2: False, 3: False, 128: False}, RowRanges(4, 32)),  # the Xeon
        ({1: True, 2: True, 3: True, 128: True}, RowRanges(1, None)),  # the EPYC
        ({1: False, 2: True, 3: True, 128: False}, RowRanges(2, 32)),
        ({1: True, 2: False, 3: True, 128: True}, RowRanges(3, None)),  # plain for 1-2: no gaps
    ],
)
def test_the_measured_ranges_keep_plain_where_packed_is_not_10_percent_faster(
    monkeypatch: pytest.MonkeyPatch, wins: dict[int, bool], expected: RowRanges
) -> None:
    timed: list[tuple[int, bool]] = []

    def fake(linears: list[PrepackedLinear], rows: int, plain: bool, repeats: int = 3) -> float:
        timed.append((rows, plain))
        return 1.0 if plain else (0.85 if wins[rows] else 0.95)  # 0.95: within the 10% margin

    monkeypatch.setattr(prepacked, "_pass_seconds", fake)
    weight = torch.randn(8, 8)
    ranges, times = measure_row_ranges([PrepackedLinear(weight, plain=True)])
    assert ranges == expected and set(times) == {1, 2, 3, 128}
    assert sorted(timed) == sorted((r, p) for r in (1, 2, 3, 128) for p in (True, False))
    assert [ranges.plain(r) for r in (1, 2, 3, 4, 32, 33)] == [
        r < expected.packed_min or (expected.packed_max is not None and r > expected.packed_max)
        for r in (1, 2, 3, 4, 32, 33)
    ]


def test_measuring_the_ranges_times_real_linears_within_the_byte_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(prepacked, "CALIBRATION_BYTES", 3 * 64 * 48 * 4)
    linears = [PrepackedLinear(torch.randn(64, 48), plain=True) for _ in range(5)]
    seen: list[int] = []
    real = prepacked._pass_seconds

    def counting(sample: list[PrepackedLinear], rows: int, plain: bool, repeats: int = 3) -> float:
        seen.append(len(sample))
        return real(sample, rows, plain, repeats=1)

    monkeypatch.setattr(prepacked, "_pass_seconds", counting)
    ranges, times = measure_row_ranges(linears)
    assert set(seen) == {3}  # the first three linears make the budget
    assert all(a > 0 and b > 0 for a, b in times.values())
    assert 1 <= ranges.packed_min <= PACKED_MIN_ROWS and ranges.packed_max in (None, PACKED_MAX_ROWS)
