"""`lorax-bench quantized`'s variants: each names a model and a --quantize as the worker takes them,
and anything else is refused before a model is loaded."""

from __future__ import annotations

import pytest

from loraxpy.bench.quantized_cli import Variant, parse_variant, quantized_main
from loraxpy.worker.model_source import default_gguf_path


def test_variants_name_the_model_and_the_workers_quantize() -> None:
    assert parse_variant("fp32", "/m") == Variant("fp32", "/m", None)
    assert parse_variant("bitsandbytes-nf4", None) == Variant("bitsandbytes-nf4", None, "bitsandbytes-nf4")
    assert parse_variant("gptq=/ckpt", "/m") == Variant("gptq", "/ckpt", "gptq")
    assert parse_variant("gguf", None) == Variant("gguf", str(default_gguf_path()), None)
    assert parse_variant("gguf=/x.gguf", None) == Variant("gguf", "/x.gguf", None)


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("awq", "awq=DIR"),
        ("int3", "unknown variant 'int3'"),
        ("fp8=/x", "unknown variant"),
        ("eetq", "unknown"),
    ],
)
def test_bad_variants_are_refused_before_loading(
    variant: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert quantized_main(["--variants", f"fp32,{variant}", "--model-id", "/nonexistent"]) == 2
    assert message in capsys.readouterr().err
