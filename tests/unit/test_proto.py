"""The committed gRPC stubs are what `make proto` generates from worker.proto."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"


def _load_generator():
    spec = importlib.util.spec_from_file_location("generate", PROTO_DIR / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    for fresh in _load_generator().generate(tmp_path):
        committed = PROTO_DIR / fresh.name
        assert committed.read_text() == fresh.read_text(), f"{fresh.name} is stale: run `make proto`"


def test_every_rpc_and_field_has_a_comment() -> None:
    lines = (PROTO_DIR / "worker.proto").read_text().splitlines()
    declaration = re.compile(r"^\s*(rpc \w+|(optional |repeated )?\w+ \w+ = \d+;)")
    for i, line in enumerate(lines):
        if not declaration.match(line):
            continue
        above = lines[i - 1].strip()
        assert above.startswith("//") or "//" in line, (
            f"worker.proto line {i + 1} has no comment: {line.strip()}"
        )
