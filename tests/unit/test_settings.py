"""One declaration per setting (proto/settings.py): lorax-launcher hands its shards every worker
setting it was given, the worker parses them back to the same values, and each setting is read from
its environment variable by every program that has it, a flag taking precedence."""

from __future__ import annotations

import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from loraxpy.kernels.attention import ATTENTION_BACKENDS, KV_CACHE_DTYPES
from loraxpy.proto.settings import env_names
from loraxpy.proto.worker_settings import (
    ATTENTION_BACKEND_NAMES,
    CPU_WEIGHT_LAYOUTS,
    DTYPE_NAMES,
    KV_CACHE_DTYPE_NAMES,
    WorkerSettings,
)
from loraxpy.router import launcher
from loraxpy.router.config import RouterConfig
from loraxpy.router.config import parse_args as parse_router_args
from loraxpy.worker.config import DTYPES, WorkerConfig
from loraxpy.worker.config import parse_args as parse_worker_args
from loraxpy.worker.prepacked import LAYOUTS

# A value other than the default for every worker setting, as a launcher's flags.
NOT_DEFAULTS: dict[str, Any] = {
    "model_id": "/models/m",
    "revision": "abc123",
    "dtype": "bfloat16",
    "attention_backend": "sdpa",
    "cpu_weight_layout": "plain",
    "cuda_graph_max_batch_size": 4,
    "quantize": "fp8",
    "kv_cache_dtype": "fp8",
    "block_size": 32,
    "kv_cache_memory_mib": 256,
    "gpu_memory_utilization": 0.5,
    "max_lora_rank": 16,
    "adapter_root": Path("/adapters"),
    "adapter_memory_fraction": 0.25,
    "adapter_host_cache_mib": 100,
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in env_names(RouterConfig) | env_names(WorkerConfig) | {"WORKER_SECRET"}:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_launcher_hands_its_shards_every_worker_setting_it_was_given(
    clean_env: pytest.MonkeyPatch,
) -> None:
    assert set(NOT_DEFAULTS) == {f.name for f in fields(WorkerSettings)}  # a new setting joins this test
    defaults = WorkerSettings()
    assert all(getattr(defaults, name) != value for name, value in NOT_DEFAULTS.items())
    argv = [
        arg for name, value in NOT_DEFAULTS.items() for arg in ("--" + name.replace("_", "-"), str(value))
    ]
    config = parse_router_args([*argv, "--num-shard", "2", "--max-active-adapters", "5"])
    spawned: list[list[str]] = []
    clean_env.setattr(subprocess, "Popen", lambda cmd, env: spawned.append(cmd))
    launcher.spawn_shards(config, Path("/tmp"), "secret")
    assert len(spawned) == 2
    for cmd in spawned:
        assert cmd[1:3] == ["-m", "loraxpy.worker.cli"]
        worker = parse_worker_args(cmd[3:])
        assert {name: getattr(worker, name) for name in NOT_DEFAULTS} == NOT_DEFAULTS
        assert worker.max_loras == launcher.adapter_slots(config) == 5
        assert worker.adapter_settings.policy() == config.adapter_policy()  # sources pinned as the router's


def test_settings_come_from_the_environment_for_launcher_and_worker_and_flags_win(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("CUDA_GRAPH_MAX_BATCH_SIZE", "3")
    clean_env.setenv("ADAPTER_ROOT", "~/adapters")
    clean_env.setenv("MODEL_ID", "")  # empty: unset
    worker = parse_worker_args(["--listen", "unix:///w.sock"])
    router = parse_router_args([])
    for config in (worker, router):
        assert config.cuda_graph_max_batch_size == 3
        assert config.adapter_root == Path("~/adapters").expanduser()
        assert config.model_id is None
    assert (
        parse_worker_args(
            ["--listen", "unix:///w.sock", "--cuda-graph-max-batch-size", "7"]
        ).cuda_graph_max_batch_size
        == 7
    )
    assert parse_router_args(["--cuda-graph-max-batch-size", "7"]).cuda_graph_max_batch_size == 7
    clean_env.setenv("LORAX_WORKER_LISTEN", "unix:///env.sock")  # the worker's own names kept
    clean_env.setenv("LORAX_DEVICE", "cpu")
    clean_env.setenv("MAX_LORAS", "2")
    worker = parse_worker_args([])
    assert (worker.listen, worker.device, worker.max_loras) == ("unix:///env.sock", "cpu", 2)


def test_bad_settings_are_refused_by_the_launcher_before_any_shard_starts(
    clean_env: pytest.MonkeyPatch,
) -> None:
    for argv, message in (
        (["--dtype", "float64"], "--dtype"),
        (["--block-size", "24"], "power of two"),
        (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
        (["--quantize", "eetq"], "EETQ"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_router_args(argv)
        with pytest.raises(ValueError, match=message):
            parse_worker_args(["--listen", "unix:///w.sock", *argv])
    with pytest.raises(SystemExit):
        parse_router_args(["--cpu-weight-layout", "tiled"])
    clean_env.setenv("PREFIX_CACHING", "maybe")
    with pytest.raises(ValueError, match="not a boolean"):
        parse_router_args([])


def test_the_torch_free_names_are_the_workers() -> None:
    assert tuple(DTYPES) == DTYPE_NAMES
    assert ATTENTION_BACKEND_NAMES == ATTENTION_BACKENDS
    assert CPU_WEIGHT_LAYOUTS == LAYOUTS
    assert KV_CACHE_DTYPE_NAMES == KV_CACHE_DTYPES


def test_the_worker_hands_its_runner_every_setting_it_was_given(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every RunnerOptions field is the worker's setting of that name, or says what it is built from."""
    from loraxpy.worker import cli
    from loraxpy.worker.runner import RunnerOptions

    argv = [
        arg for name, value in NOT_DEFAULTS.items() for arg in ("--" + name.replace("_", "-"), str(value))
    ]
    clean_env.setenv("HF_HUB_OFFLINE", "1")
    clean_env.setenv("HF_TOKEN", "hub-token")
    config = parse_worker_args([*argv, "--listen", "unix:///w.sock", "--max-loras", "3", "--device", "cpu"])
    built: list[RunnerOptions] = []
    clean_env.setattr(cli, "resolve_model", lambda *args, **kwargs: tmp_path)
    clean_env.setattr(cli, "init_distributed", lambda *args: None)
    clean_env.setattr(cli, "is_encoder_folder", lambda path: False)
    clean_env.setattr(cli, "ModelRunner", lambda path, options: built.append(options))
    cli.build_runner(config)
    (options,) = built
    converted = {
        "dtype": (options.dtype, DTYPES["bfloat16"]),
        "device": (str(options.device), "cpu"),
        "shard": ((options.shard.rank, options.shard.world_size), (0, 1)),
        "kv_cache_bytes": (options.kv_cache_bytes, 256 * 2**20),
        "adapter_host_cache_bytes": (options.adapter_host_cache_bytes, 100 * 2**20),
    }
    for f in fields(RunnerOptions):
        ours, expected = converted.get(f.name) or (getattr(options, f.name), getattr(config, f.name))
        assert ours == expected, f.name
    assert (options.max_loras, options.hub_token, options.offline) == (3, "hub-token", True)


def test_lorax_bench_runs_the_engine_with_the_workers_settings(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The engine benchmark's device and runner settings are the worker's flags: the same names,
    defaults (decode CUDA graphs off on every device), environment variables and checks."""
    from types import SimpleNamespace

    from loraxpy.bench import cli as bench_cli
    from loraxpy.bench import suite
    from loraxpy.bench.engine import RunSpec
    from loraxpy.bench.workloads import Workload
    from loraxpy.worker.runner import RunnerOptions

    def bench_config(*argv: str) -> suite.BenchConfig:
        return bench_cli.config_from_args(bench_cli.build_parser().parse_args(list(argv)))

    for device in ("cpu", "cuda"):
        assert bench_config("--device", device).engine == WorkerSettings()
    clean_env.setenv("CUDA_GRAPH_MAX_BATCH_SIZE", "3")
    clean_env.setenv("CPU_WEIGHT_LAYOUT", "plain")
    worker = parse_worker_args(["--listen", "unix:///w.sock"])
    engine = bench_config("--device", "cpu").engine
    assert (engine.cuda_graph_max_batch_size, engine.cpu_weight_layout) == (3, "plain")
    assert (worker.cuda_graph_max_batch_size, worker.cpu_weight_layout) == (3, "plain")
    clean_env.setenv("LORAX_DEVICE", "cpu")  # --device too is the worker's
    assert bench_config().device == parse_worker_args(["--listen", "unix:///w.sock"]).torch_device()
    assert bench_cli.main(["--device", "tpu"]) == 2

    given = {name: NOT_DEFAULTS[name] for name in bench_cli.ENGINE_SETTINGS}
    argv = [arg for name, value in given.items() for arg in ("--" + name.replace("_", "-"), str(value))]
    config = bench_config("--device", "cpu", *argv)
    assert {name: getattr(config.engine, name) for name in given} == given
    assert config.dtype == DTYPES["bfloat16"]
    built: list[RunnerOptions] = []
    clean_env.setattr(suite, "EngineBench", lambda model_dir, pool, options, **sizes: built.append(options))
    spec = RunSpec(Workload("uniform-3", "uniform", 3, (8,)), 2, 8, 1, 2)
    suite._engine(config, tmp_path, SimpleNamespace(root=tmp_path / "adapters"), 8, [spec])  # type: ignore[arg-type]
    (options,) = built
    assert (options.dtype, options.attention_backend, options.cpu_weight_layout) == (
        DTYPES["bfloat16"],
        "sdpa",
        "plain",
    )
    assert (options.cuda_graph_max_batch_size, options.block_size) == (4, 32)
    assert (options.max_loras, options.max_lora_rank, options.adapter_root) == (3, 8, tmp_path / "adapters")

    assert bench_cli.main(["--device", "cpu", "--block-size", "24"]) == 2  # the worker's own check
    with pytest.raises(ValueError, match="no flags"):
        bench_cli.add_flags(bench_cli.build_parser(), WorkerSettings, names=["listen"])
