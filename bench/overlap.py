"""`lorax-bench serve --compare-overlap MODEL`: the same workload against a launcher with
`--overlap-steps false` and then one with `--overlap-steps true`, and their ratios.

MODEL is a shape of `lorax-bench` (random weights and a word-level tokenizer, written to a
temporary folder: `tiny` is where the router's cost per step weighs most), `default` (the
packaged SmolLM2-135M) or a local HF folder. Each report has the workers' busy share of the run's
wall time and the router's overhead per step, both from the server's /metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from loraxpy.bench.served import ServerOptions, launched_server
from loraxpy.bench.serving import ServeConfig, ServeReport, format_report, report_dict, run_serving
from loraxpy.bench.shapes import SHAPES, write_random_model

DEFAULT_CACHE = Path(os.environ.get("LORAX_CACHE", "~/.cache/loraxpy")).expanduser()


def write_word_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer for a random model: "w7" is token 7, other words are token 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({}))


def model_folder(model: str, workdir: Path) -> Path:
    if model in SHAPES:
        path = workdir / model
        if not (path / "config.json").exists():
            shape = SHAPES[model]
            write_random_model(shape, path, torch.float32)
            write_word_tokenizer(path, shape.vocab_size)
        return path
    if model == "default":
        from loraxpy.worker.model_source import convert_default_model

        return convert_default_model(DEFAULT_CACHE)
    return Path(model)


def word_prompt(num_words: int) -> str:
    """A prompt of `num_words` in-vocabulary words for the word-level tokenizer."""
    return " ".join(f"w{3 + i % 200}" for i in range(num_words))


def _options(folder: Path, work: Path, config: ServeConfig, overlap: str) -> ServerOptions:
    return ServerOptions(
        model_dir=folder,
        adapter_root=work,
        log_path=work / f"server-overlap-{overlap}.log",
        threads=None,
        max_batch_size=max(128, config.num_requests),
        max_adapters=1,
        max_lora_rank=16,
        prefill_tokens=4096,
        kv_cache_mib=1024,
        extra_args=("--overlap-steps", overlap),
    )


def compare_overlap(
    config: ServeConfig, model: str, rounds: int = 3, workdir: Path | None = None
) -> tuple[dict[str, Any], bool]:
    """Runs `config` against a server without and one with --overlap-steps, both up side by side,
    alternating for `rounds` rounds (a shared machine's load changes between runs); the JSON, and
    whether every run served."""
    with tempfile.TemporaryDirectory(prefix="lorax-bench-overlap-") as tmp:
        work = workdir or Path(tmp)
        folder = model_folder(model, work)
        if model in SHAPES:  # its tokenizer knows only "w<id>" words
            config = dataclasses.replace(config, prompt=word_prompt(len(config.prompt.split())))
        runs: dict[str, list[tuple[ServeReport, Any]]] = {"false": [], "true": []}
        with (
            launched_server(_options(folder, work, config, "false")) as off_url,
            launched_server(_options(folder, work, config, "true")) as on_url,
        ):
            for i in range(rounds):
                for overlap, url in (("false", off_url), ("true", on_url)):
                    run = dataclasses.replace(config, url=url)
                    report, records = asyncio.run(run_serving(run))
                    print(f"round {i + 1}, --overlap-steps {overlap}:\n" + format_report(report))
                    runs[overlap].append((report, report_dict(run, report, records)))
    ratios = [
        on.output_tokens_per_s / off.output_tokens_per_s if off.output_tokens_per_s else 0.0
        for (off, _), (on, _) in zip(runs["false"], runs["true"], strict=True)
    ]
    print("overlap on / off, output throughput by round: " + ", ".join(f"{r:.3f}" for r in ratios))
    body = {
        "model": model,
        "off": [body for _, body in runs["false"]],
        "on": [body for _, body in runs["true"]],
        "throughput_ratios": ratios,
    }
    ok = all(r.num_failed < r.num_requests for reports in runs.values() for r, _ in reports)
    return body, ok
