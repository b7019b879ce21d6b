"""Adapter files are untrusted: header-only checks before any tensor is read, files confined where
they may be, and PEFT's alpha_pattern semantics without running a regex from the file."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loraxpy.worker import adapters as adapters_module
from loraxpy.worker.adapters import (
    AdapterError,
    find_adapter_files,
    load_peft_adapter,
    module_name,
    pattern_value,
)
from loraxpy.worker.model_config import ModelConfig

HF_CONFIG = dict(
    model_type="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=12,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> ModelConfig:
    folder = tmp_path_factory.mktemp("base")
    (folder / "config.json").write_text(json.dumps(HF_CONFIG))
    return ModelConfig.from_folder(folder)


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], **config: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 8, **config}))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def q_proj(layer: int = 0, r: int = 4, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
    return {
        f"{prefix}.lora_A.weight": torch.randn(r, 32).to(dtype),
        f"{prefix}.lora_B.weight": torch.randn(32, r).to(dtype),
    }


class HeadersOnly:
    """safe_open that hands out headers but fails the test if any tensor is read."""

    def __init__(self, path: str, framework: str) -> None:
        self._cm = safe_open(path, framework=framework)

    def __enter__(self) -> HeadersOnly:
        self._f = self._cm.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)

    def keys(self) -> list[str]:
        return list(self._f.keys())

    def get_slice(self, name: str) -> object:
        return self._f.get_slice(name)

    def get_tensor(self, name: str) -> torch.Tensor:
        raise AssertionError(f"tensor {name} was read before the header was checked")


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (q_proj(r=128), "exceeds --max-lora-rank"),
        (q_proj(dtype=torch.float64), "only 2-D F32/F16/BF16"),
        (
            {
                "x.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 31),
                "x.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 4),
            },
            "do not fit",
        ),
        (q_proj(layer=12), "does not fit the model"),
        ({f"model.layers.{'9' * 100}.self_attn.q_proj.lora_A.weight": torch.zeros(1, 1)}, "cannot adapt"),
        ({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)}, "must both be present"),
        ({"model.embed_tokens.base_layer.weight": torch.zeros(65, 32)}, "replaces the model's embed_tokens"),
        ({"model.layers.0.self_attn.rotary.weight": torch.zeros(2, 2)}, "cannot adapt"),
    ],
)
def test_header_problems_are_refused_before_any_tensor_is_read(
    tmp_path: Path, config: ModelConfig, monkeypatch: pytest.MonkeyPatch, tensors: dict, message: str
) -> None:
    folder = write_adapter(tmp_path / "a", tensors)
    monkeypatch.setattr(adapters_module, "safe_open", HeadersOnly)
    with pytest.raises(AdapterError, match=message):
        load_peft_adapter(folder, config, max_rank=64)


def test_files_past_the_size_cap_and_bad_headers_are_refused_unopened(
    tmp_path: Path, config: ModelConfig
) -> None:
    folder = write_adapter(tmp_path / "big", q_proj(r=8))
    with pytest.raises(AdapterError, match="this server takes at most 1000"):
        load_peft_adapter(folder, config, max_rank=64, max_bytes=1000)
    # A header that claims a terabyte is never parsed.
    bad = write_adapter(tmp_path / "header", q_proj())
    (bad / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(AdapterError, match="unreadable"):
        load_peft_adapter(bad, config, max_rank=64)
    # The default cap is the largest adapter the model can serve at max_rank.
    assert load_peft_adapter(folder, config, max_rank=8).rank == 8


def test_bin_weights_are_checked_from_their_headers_too(tmp_path: Path, config: ModelConfig) -> None:
    folder = tmp_path / "bin"
    write_adapter(folder, q_proj())
    (folder / "adapter_model.safetensors").unlink()
    torch.save(q_proj(r=128), folder / "adapter_model.bin")
    with pytest.raises(AdapterError, match="exceeds --max-lora-rank"):
        load_peft_adapter(folder, config, max_rank=64)
    torch.save(q_proj(r=4), folder / "adapter_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(AdapterError, match="unreadable"):  # not memory-mappable: not read whole either
        load_peft_adapter(folder, config, max_rank=64)


def test_adapter_files_must_be_regular_files_inside_the_folder(tmp_path: Path, config: ModelConfig) -> None:
    outside = write_adapter(tmp_path / "outside", q_proj())
    root = tmp_path / "root"
    linked = write_adapter(root / "linked", q_proj())
    (linked / "adapter_model.safetensors").unlink()
    (linked / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="points outside"):
        find_adapter_files(linked, root.resolve(), 1 << 20)
    fifo = write_adapter(root / "fifo", q_proj())
    (fifo / "adapter_model.safetensors").unlink()
    os.mkfifo(fifo / "adapter_model.safetensors")  # opening it would block forever
    with pytest.raises(AdapterError, match="not a regular file"):
        find_adapter_files(fifo, root.resolve(), 1 << 20)


# ---- alpha_pattern / rank_pattern ----------------------------------------------------------------


def test_alpha_and_rank_patterns_give_peft_s_scales(tmp_path: Path, config: ModelConfig) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in HF_CONFIG.items() if k != "model_type"}))
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        alpha_pattern={"q_proj": 32, "model.layers.1.mlp.down_proj": 3, "layers.11.self_attn.v_proj": 5},
        rank_pattern={"down_proj": 2},
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(tmp_path / "patterned")
    ours = load_peft_adapter(tmp_path / "patterned", config, max_rank=64)
    checked = 0
    for name, module in peft_model.named_modules():
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
            layer, target = int(name.split("layers.")[1].split(".")[0]), name.rsplit(".", 1)[1]
            assert ours.scales[(layer, target)] == pytest.approx(module.scaling["default"]), name
            checked += 1
    assert checked == 36


PLAIN_KEYS = [
    "q_proj",
    "proj",
    "self_attn.q_proj",
    "1.self_attn.q_proj",
    "layers.1.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "layers.11.mlp.down_proj",
    r"layers\.1\.mlp\.down_proj",
    "layers.1",
    "lm_head",
    "model",
]


@pytest.mark.parametrize("key", PLAIN_KEYS)
def test_plain_keys_match_the_modules_peft_matches(key: str) -> None:
    from peft.utils.other import get_pattern_key

    modules = [module_name(layer, t) for layer in (0, 1, 11) for t in ("q_proj", "down_proj")] + ["lm_head"]
    for module in modules:
        peft_matches = get_pattern_key([key], module) == key
        assert (pattern_value({key: 1.0}, module) is not None) == peft_matches, module


@pytest.mark.parametrize("key", ["(.*)*z", "(a+)+$", "q_proj|v_proj", "layers.[0-9]+.q_proj", "x" * 300])
def test_regex_keys_are_refused_at_once(key: str) -> None:
    started = time.perf_counter()
    with pytest.raises(AdapterError, match="regular expression"):
        pattern_value({key: 2.0}, "model.layers.0.self_attn.q_proj")
    assert time.perf_counter() - started < 0.1


def test_a_catastrophic_alpha_pattern_does_not_stall_the_load(tmp_path: Path, config: ModelConfig) -> None:
    """Compiled as a regex over a module name, `(.*)*z` runs for hours holding the GIL; here the
    adapter is refused at once. In a subprocess, so a stall fails the test instead of hanging it."""
    write_adapter(tmp_path / "redos", q_proj(), alpha_pattern={"(.*)*z": 2})
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    script = (
        "import sys; from pathlib import Path\n"
        "from loraxpy.worker.adapters import AdapterError, load_peft_adapter\n"
        "from loraxpy.worker.model_config import ModelConfig\n"
        f"config = ModelConfig.from_folder(Path({str(tmp_path)!r}))\n"
        "try:\n"
        f"    load_peft_adapter(Path({str(tmp_path / 'redos')!r}), config, max_rank=64)\n"
        "except AdapterError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "regular expression" in done.stdout, done.stderr


def test_alpha_values_must_be_finite_numbers(tmp_path: Path, config: ModelConfig) -> None:
    for bad in ({"lora_alpha": "8"}, {"lora_alpha": 1e400}, {"alpha_pattern": {"q_proj": True}}):
        folder = write_adapter(tmp_path / f"bad-{len(os.listdir(tmp_path))}", q_proj(), **bad)
        with pytest.raises(AdapterError, match="finite number"):
            load_peft_adapter(folder, config, max_rank=64)
