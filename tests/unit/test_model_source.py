"""Model resolution: local folders, the Hugging Face hub cache layout (real huggingface_hub code), errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraxpy.worker.model_source import ModelSourceError, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_model_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "tokenizer.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))


def write_hub_cache(hub: Path, repo_id: str) -> Path:
    """Lays out a repo as huggingface_hub stores it: blobs, a snapshot of symlinks, refs/main."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    staging = repo / "staging"
    write_model_files(staging)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(staging.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        f.rename(blob)
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    staging.rmdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_hub_id_resolves_to_the_cached_snapshot(tmp_path: Path) -> None:
    snapshot = write_hub_cache(tmp_path / "hub", "org/tiny")
    found = resolve_model("org/tiny", cache_dir=tmp_path, hub_cache_dir=tmp_path / "hub", offline=True)
    assert found == snapshot
    assert (found / "model.safetensors").exists()


def test_hub_revision_by_commit_hash(tmp_path: Path) -> None:
    snapshot = write_hub_cache(tmp_path / "hub", "org/tiny")
    found = resolve_model(
        "org/tiny", revision=COMMIT, cache_dir=tmp_path, hub_cache_dir=tmp_path / "hub", offline=True
    )
    assert found == snapshot


def test_uncached_hub_model_offline_names_the_model(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="org/absent"):
        resolve_model("org/absent", cache_dir=tmp_path, hub_cache_dir=tmp_path / "hub", offline=True)


def test_local_folder_is_used_as_is(tmp_path: Path) -> None:
    write_model_files(tmp_path / "m")
    assert resolve_model(str(tmp_path / "m"), cache_dir=tmp_path) == (tmp_path / "m").resolve()


def test_missing_local_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"), cache_dir=tmp_path)


def test_folder_without_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError, match="safetensors"):
        resolve_model(str(tmp_path / "m"), cache_dir=tmp_path)


@pytest.mark.slow
def test_default_model_is_converted_once_and_reused(
    default_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loraxpy.worker import model_source

    config = json.loads((default_model_path / "config.json").read_text())
    assert (
        config["model_type"],
        config["num_hidden_layers"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["tie_word_embeddings"],
    ) == ("llama", 30, 9, 3, True)
    assert "quantization_config" not in config
    assert (default_model_path / "tokenizer.json").exists()
    template = default_model_path / "chat_template.jinja"
    tokenizer_config = json.loads((default_model_path / "tokenizer_config.json").read_text())
    assert template.exists() or "chat_template" in tokenizer_config

    def must_not_convert(*args: object) -> None:
        raise AssertionError("converted a second time")

    monkeypatch.setattr(model_source, "_convert_gguf", must_not_convert)
    assert resolve_model(None, cache_dir=default_model_path.parents[1]) == default_model_path
