"""An adapter's own chat template, read by the worker from the tokenizer_config.json beside its
weights: the string form and HF's named-template list, none at all, and malformed or oversized
files refused with a message (adapter files are untrusted input)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loraxpy.worker.adapters import MAX_CHAT_TEMPLATE_CHARS, AdapterError, find_adapter_files


def adapter_folder(tmp_path: Path, tokenizer_config: Any = None, raw: bytes | None = None) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    if raw is not None:
        (folder / "tokenizer_config.json").write_bytes(raw)
    elif tokenizer_config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def template_of(folder: Path) -> str:
    return find_adapter_files(folder, folder, 1 << 20).chat_template()


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (None, ""),
        ({"eos_token": "</s>"}, ""),
        ({"chat_template": "{{ messages[0]['content'] }}"}, "{{ messages[0]['content'] }}"),
        (
            {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]},
            "D",
        ),
        ({"chat_template": [{"name": "tool_use", "template": "T"}]}, ""),
    ],
)
def test_the_template_is_the_string_or_the_default_named_one(
    tmp_path: Path, config: Any, expected: str
) -> None:
    assert template_of(adapter_folder(tmp_path, config)) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not valid JSON"),
        (json.dumps({"chat_template": 5}).encode(), "must be a string"),
        (json.dumps({"chat_template": "x" * (MAX_CHAT_TEMPLATE_CHARS + 1)}).encode(), "at most"),
        (b"[" * 100_000, "not valid JSON"),
    ],
)
def test_a_malformed_or_oversized_template_is_refused_with_a_message(
    tmp_path: Path, raw: bytes, message: str
) -> None:
    with pytest.raises(AdapterError, match=message):
        template_of(adapter_folder(tmp_path, raw=raw))


def test_a_tokenizer_config_outside_the_folder_is_refused(tmp_path: Path) -> None:
    folder = adapter_folder(tmp_path)
    outside = tmp_path / "secret.json"
    outside.write_text(json.dumps({"chat_template": "x"}))
    (folder / "tokenizer_config.json").symlink_to(outside)
    with pytest.raises(AdapterError, match="outside"):
        template_of(folder)
