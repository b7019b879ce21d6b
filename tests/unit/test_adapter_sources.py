"""Where a worker reads adapters from, and who may: hub access per token (a stand-in for the hub's
API over a real local hub cache), the operator's allow-lists, S3 through moto, confinement, the
disk tier's byte budget and the capped, timed load executor."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from loraxpy.proto.adapter_policy import SOURCES, AdapterPolicy
from loraxpy.worker.adapter_disk_cache import DiskCache
from loraxpy.worker.adapter_loads import AdapterLoads
from loraxpy.worker.adapter_sources import SourceOptions
from loraxpy.worker.adapter_store import AdapterStore
from loraxpy.worker.adapters import (
    AdapterBusyError,
    AdapterError,
    AdapterFiles,
    AdapterNotFoundError,
    AdapterTimeoutError,
    LoraAdapter,
    read_adapter_files,
)
from loraxpy.worker.merge import MergeRequest
from loraxpy.worker.model_config import ModelConfig

COMMIT = "c" * 40
SERVER_TOKEN = "hf_server_own_token"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> ModelConfig:
    folder = tmp_path_factory.mktemp("base")
    hf = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    (folder / "config.json").write_text(
        json.dumps({**hf, "num_attention_heads": 4, "num_key_value_heads": 2})
    )
    return ModelConfig.from_folder(folder)


def adapter_files(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 8}))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{prefix}.lora_A.weight": torch.randn(4, 32), f"{prefix}.lora_B.weight": torch.randn(32, 4)}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def hub_cache(hub: Path, repo_id: str, seed: int) -> None:
    """Lays out an adapter as huggingface_hub caches a repo: blobs, a snapshot of links, refs/main."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    files = adapter_files(repo / "src", seed)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(files.iterdir())):  # blobs are named by hash, not by file
        f.rename(repo / "blobs" / f"{i:040x}")
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / f"{i:040x}")
    files.rmdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


class FakeHub:
    """The hub's model_info: each repo answers only the tokens in `readers` (False: anonymous)."""

    def __init__(self) -> None:
        self.readers: dict[str, set[Any]] = {
            "acme/private": {"tok-a"},
            "acme/public": {False, "tok-a", "tok-b"},
        }
        self.tokens_seen: list[Any] = []

    def model_info(self, api: object, repo_id: str, *, token: Any = None, **kwargs: Any) -> Any:
        import httpx2
        from huggingface_hub.errors import RepositoryNotFoundError
        from huggingface_hub.hf_api import ModelInfo

        self.tokens_seen.append(token)
        if token not in self.readers.get(repo_id, set()):
            response = httpx2.Response(
                401, request=httpx2.Request("GET", f"https://hub/api/models/{repo_id}")
            )
            raise RepositoryNotFoundError(f"{repo_id} not found", response=response)
        return ModelInfo(id=repo_id, sha=COMMIT, siblings=[{"rfilename": "adapter_config.json", "size": 40}])


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, FakeHub]]:
    from huggingface_hub import HfApi

    cache = tmp_path / "hub"
    for seed, repo in enumerate(("acme/private", "acme/public", "other/private")):
        hub_cache(cache, repo, seed)
    fake = FakeHub()
    fake.readers["other/private"] = {SERVER_TOKEN}
    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id, **kw: fake.model_info(self, repo_id, **kw))
    yield cache, fake


def make_store(
    tmp: Path, config: ModelConfig, hub_dir: Path | None = None, **policy: Any
) -> tuple[AdapterStore, list[AdapterFiles]]:
    offline = policy.pop("offline", False)
    root = policy.pop("adapter_root", None)
    disk_bytes = policy.pop("disk_bytes", 1 << 30)
    parsed: list[AdapterFiles] = []

    def parse(files: AdapterFiles) -> LoraAdapter:
        parsed.append(files)
        return read_adapter_files(files, config, 64, 1 << 20)

    options = SourceOptions(
        AdapterPolicy(frozenset(SOURCES), **policy), root, hub_dir, SERVER_TOKEN, offline, 1 << 20
    )
    return AdapterStore(options, tmp / "downloads", disk_bytes, 1 << 30, parse), parsed


def test_a_private_hub_adapter_is_read_only_with_a_token_the_hub_accepts(
    tmp_path: Path, config: ModelConfig, hub: tuple[Path, FakeHub]
) -> None:
    cache, fake = hub
    store, parsed = make_store(tmp_path, config, cache)
    for token in ("", "tok-b"):  # cached on disk, yet never read without the hub's yes
        with pytest.raises(AdapterNotFoundError):
            store.read("acme/private", "hub", token)
    assert fake.tokens_seen == [False, "tok-b"]  # anonymous, never the server's own token
    owned = store.read("acme/private", "hub", "tok-a")
    for token in ("", "tok-b"):  # what tok-a loaded stays tok-a's, alone or inside a merge
        with pytest.raises(AdapterNotFoundError):
            store.read("acme/private", "hub", token)
        merge = MergeRequest(("acme/public", "acme/private"), (1.0, 1.0))
        with pytest.raises(AdapterNotFoundError):
            store.read("m", "hub", token, merge)
    fake.tokens_seen.clear()
    assert store.read("./acme/private/.", "hub", "tok-a") is owned  # one identity, remembered access
    assert fake.tokens_seen == [] and len(parsed) == 2  # acme/private and acme/public, once each
    assert store.download("acme/private", "hub", "tok-a")[0] > 0 and fake.tokens_seen == ["tok-a"]


def test_the_server_token_and_the_offline_cache_serve_only_allowed_repos(
    tmp_path: Path, config: ModelConfig, hub: tuple[Path, FakeHub]
) -> None:
    cache, fake = hub
    store, _ = make_store(tmp_path / "a", config, cache)
    with pytest.raises(AdapterNotFoundError):  # its token could read it: not used for this repo
        store.read("other/private", "hub", "")
    assert fake.tokens_seen == [False]
    allowed, _ = make_store(tmp_path / "b", config, cache, hub_allowed=("other",))
    allowed.read("other/private", "hub", "")
    assert fake.tokens_seen[-1] == SERVER_TOKEN
    fake.tokens_seen.clear()
    offline, _ = make_store(tmp_path / "c", config, cache, hub_allowed=("acme/public",), offline=True)
    offline.read("acme/public", "hub", "")
    for repo, token in (("acme/private", "tok-a"), ("other/private", "")):  # access cannot be checked
        with pytest.raises(AdapterNotFoundError):
            offline.read(repo, "hub", token)
    assert fake.tokens_seen == []


def test_local_ids_resolve_to_one_identity_inside_the_root(tmp_path: Path, config: ModelConfig) -> None:
    root = tmp_path / "root"
    adapter_files(root / "x")
    adapter_files(tmp_path / "secret")
    (root / "escape").symlink_to(tmp_path / "secret")
    store, parsed = make_store(tmp_path, config, adapter_root=root)
    first = store.read("x", "local", "")
    assert all(store.read(v, "local", "tok") is first for v in ("x/", "./x", "x/.", str(root / "x")))
    assert len(parsed) == 1
    for outside in ("escape", "../secret", str(tmp_path / "secret"), "nope"):
        with pytest.raises(AdapterNotFoundError, match="not found"):
            store.read(outside, "local", "")


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    moto = pytest.importorskip("moto")
    import boto3

    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with moto.mock_aws():
        client = boto3.client("s3")
        for bucket in ("team", "other"):
            client.create_bucket(Bucket=bucket)
        yield client


def upload(client: Any, folder: Path, bucket: str, prefix: str) -> None:
    for f in folder.iterdir():
        client.upload_file(str(f), bucket, f"{prefix}/{f.name}")


def test_s3_adapters_come_from_allowed_buckets_into_hashed_folders(
    tmp_path: Path, config: ModelConfig, s3: Any
) -> None:
    files = adapter_files(tmp_path / "src")
    upload(s3, files, "team", "a")
    upload(s3, files, "team", "a/nested")  # under the prefix, not the adapter's own files
    upload(s3, files, "other", "a")
    s3.put_object(Bucket="team", Key="big/adapter_config.json", Body=b"{}")
    s3.put_object(Bucket="team", Key="big/adapter_model.safetensors", Body=b"0" * (2 << 20))
    store, _ = make_store(tmp_path, config, s3_buckets=("team",))
    store.read("s3://team/a", "s3", "")
    downloads = tmp_path / "downloads" / "s3"
    [folder] = list(downloads.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(AdapterNotFoundError):  # exists, but not in --allowed-s3-buckets
        store.read("s3://other/a", "s3", "")
    with pytest.raises(AdapterError, match="must look like"):  # would have been an absolute path
        store.read(f"s3://team//{tmp_path}/src", "s3", "")
    with pytest.raises(AdapterError, match="takes at most"):  # refused from the listing, unread
        store.read("s3://team/big", "s3", "")
    assert len(list(downloads.iterdir())) == 1


def test_the_disk_cache_evicts_least_recently_used_folders_never_one_in_use(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    (root / "s3" / f"{'.partial-'}x").mkdir(parents=True)  # a crashed download
    cache = DiskCache(root, capacity_bytes=2500)
    assert not (root / "s3" / ".partial-x").exists()
    folders = [root / "s3" / name for name in ("a", "b", "c")]
    for folder in folders[:2]:
        with cache.using(folder):
            folder.mkdir()
            (folder / "w").write_bytes(b"0" * 1000)
    with cache.using(folders[0]), cache.using(folders[2]):  # a used again; b is now the least recent
        folders[2].mkdir()
        (folders[2] / "w").write_bytes(b"0" * 1000)
    assert [f.exists() for f in folders] == [True, False, True] and cache.nbytes == 2000
    with cache.using(folders[0]):
        big = root / "s3" / "d"
        with cache.using(big):
            big.mkdir()
            (big / "w").write_bytes(b"0" * 2000)
        assert folders[0].exists()  # in use: kept although the budget is passed
    assert DiskCache(root, capacity_bytes=10_000).nbytes == cache.nbytes  # a restart takes them up


def test_adapter_loads_are_capped_and_timed() -> None:
    loads = AdapterLoads(max_concurrent=1, timeout_s=0.2)
    gate = threading.Event()
    try:
        with pytest.raises(AdapterTimeoutError, match="--adapter-load-timeout-s"):
            loads.run(gate.wait)  # keeps running: the only thread stays busy
        outcomes: list[object] = []

        def wait() -> None:
            try:
                outcomes.append(loads.run(gate.wait))
            except AdapterTimeoutError as e:
                outcomes.append(e)

        waiting = threading.Thread(target=wait)
        waiting.start()
        waiting.join(0.05)
        with pytest.raises(AdapterBusyError):  # one running, one waiting: the third is refused at once
            loads.run(lambda: None)
    finally:
        gate.set()
    waiting.join(5)
    assert len(outcomes) == 1 and loads.run(lambda: 7) == 7
    loads.shutdown()
