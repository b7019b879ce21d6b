"""Where adapter files come from — a folder under --adapter-root, the Hugging Face hub, S3 — and
whether this request may read them.

Each source turns a canonical name (proto/adapter_policy.py) into an identity (a real path, a hub
repo at a commit, an S3 key) and the adapter's files, resolved and confined: under --adapter-root,
inside the hub cache's repo folder, or in a download folder whose name is a hash (never a path the
request spelled). Hub adapters are checked with the requester's own token (or none) before any
cached file is read; the server's HF_TOKEN and cloud credentials serve only what the operator
allows. Sizes are capped before downloading and again on disk. A refusal for lack of access reads
exactly like "not found"; the reason goes to the worker's log.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraxpy.proto.adapter_policy import (
    AdapterNotAllowedError,
    AdapterPolicy,
    AdapterRef,
    SourceNotAllowedError,
)
from loraxpy.worker.adapter_disk_cache import PARTIAL_PREFIX, DiskCache
from loraxpy.worker.adapters import (
    AdapterError,
    AdapterFiles,
    AdapterNotFoundError,
    find_adapter_files,
    is_within,
)

logger = logging.getLogger(__name__)

# tokenizer_config.json is optional: it may carry the adapter's own chat template.
ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "tokenizer_config.json",
    "config.json",  # with medusa_num_heads: the adapter ships Medusa heads (worker/medusa.py)
    "medusa_lm_head.safetensors",
)
HUB_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class SourceOptions:
    policy: AdapterPolicy
    adapter_root: Path | None  # local adapters must lie inside it; None: local adapters are off
    hub_cache_dir: Path | None  # the operator's hub cache (None: huggingface_hub's default), read first
    hub_token: str | None  # the server's own: only for hub repos the policy allows
    offline: bool
    max_adapter_bytes: int


@dataclass(frozen=True)
class Fetched:
    identity: str  # what the adapter is, whatever the request called it
    files: AdapterFiles


class AdapterSources:
    def __init__(self, options: SourceOptions, disk: DiskCache) -> None:
        self.options = options
        self.disk = disk

    @contextmanager
    def fetched(self, ref: AdapterRef, api_token: str) -> Iterator[Fetched]:
        """The adapter's files, kept on disk until the block ends; raises AdapterNotFoundError when
        it does not exist or this request may not read it."""
        try:
            self.options.policy.check(ref)
        except SourceNotAllowedError as e:
            raise AdapterError(str(e)) from None
        except AdapterNotAllowedError as e:
            logger.info("adapter %s refused: %s", ref, e)
            raise AdapterNotFoundError(str(ref)) from None
        if ref.source == "local":
            yield self._local(ref)
            return
        folder = self._download_folder(ref)
        with self.disk.using(folder):
            yield self._hub(ref, api_token, folder) if ref.source == "hub" else self._s3(ref, folder)

    def _download_folder(self, ref: AdapterRef) -> Path:
        if ref.source == "hub":  # huggingface_hub's own layout inside our cache folder
            return self.disk.root / "hub" / f"models--{ref.name.replace('/', '--')}"
        # A hash, not the key: no spelling of an S3 key can make a path outside this folder.
        return self.disk.root / "s3" / hashlib.sha256(ref.name.encode()).hexdigest()[:40]

    def _not_found(self, ref: AdapterRef, why: str) -> AdapterNotFoundError:
        logger.info("adapter %s refused: %s", ref, why)
        return AdapterNotFoundError(str(ref))

    # ---- local ------------------------------------------------------------------------------------

    def _local(self, ref: AdapterRef) -> Fetched:
        if self.options.adapter_root is None:
            raise AdapterError("local adapters are disabled: start the server with --adapter-root")
        root = self.options.adapter_root.resolve()
        path = (root / ref.name).resolve()  # an absolute name replaces root here, then is checked
        if path == root or not is_within(path, root):
            raise self._not_found(ref, "outside --adapter-root")
        if not path.is_dir():
            raise self._not_found(ref, "no such folder")
        return Fetched(f"local:{path}", find_adapter_files(path, root, self.options.max_adapter_bytes))

    # ---- hub ------------------------------------------------------------------------------------

    def _hub(self, ref: AdapterRef, api_token: str, download_folder: Path) -> Fetched:
        o = self.options
        is_operators = o.policy.is_operators(ref)
        # False: anonymous. None would let huggingface_hub fall back to HF_TOKEN, the server's.
        token: str | bool | None = (o.hub_token or None) if is_operators else (api_token or False)
        commit = None  # None: what the local cache's refs/main says (only for the operator's repos)
        if o.offline and not is_operators:
            raise self._not_found(ref, "offline: this request's access to the repo cannot be checked")
        if not o.offline:
            info = self._hub_info(ref, token, is_operators)
            if info is not None:
                commit = info.sha
                self._check_hub_sizes(ref, info)
        folder = self._hub_snapshot(ref, commit, token, download_folder)
        repo = folder.parent.parent.resolve()  # <cache>/models--org--name; the snapshot links into it
        files = find_adapter_files(folder, repo, o.max_adapter_bytes)
        return Fetched(f"hub:{ref.name}@{folder.name}", files)

    def _hub_info(self, ref: AdapterRef, token: str | bool | None, is_operators: bool) -> Any:
        """The repo's info as `token` sees it (this is the access check); None when the hub cannot
        be reached and the repo is the operator's (then the cached snapshot is served)."""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        try:
            return HfApi().model_info(ref.name, token=token, files_metadata=True, timeout=HUB_TIMEOUT_S)
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status in (401, 403, 404) or status is None:
                raise self._not_found(
                    ref, f"the hub answered {status} to this request's credentials"
                ) from None
            if not is_operators:
                raise AdapterError(
                    f"the hub answered {status}; adapter {ref} cannot be checked now"
                ) from None
        except Exception as e:  # transport errors, timeouts, malformed answers: access is unknown
            logger.warning("hub look-up of %s failed: %s: %s", ref, type(e).__name__, e)
            if not is_operators:
                raise AdapterError(f"the hub cannot be reached to check adapter {ref}; try again") from None
        return None

    def _check_hub_sizes(self, ref: AdapterRef, info: Any) -> None:
        sizes = [s.size or 0 for s in info.siblings or [] if s.rfilename in ADAPTER_FILES]
        if sum(sizes) > self.options.max_adapter_bytes:
            raise AdapterError(
                f"adapter {ref} has {sum(sizes)} bytes of files; this server takes at most "
                f"{self.options.max_adapter_bytes} (--max-adapter-size-mib)"
            )

    def _hub_snapshot(
        self, ref: AdapterRef, commit: str | None, token: str | bool | None, download_folder: Path
    ) -> Path:
        """The snapshot folder: from the operator's hub cache, then ours, else downloaded into ours."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        ours = download_folder.parent
        for cache in (self.options.hub_cache_dir, ours):
            try:
                found = snapshot_download(
                    ref.name,
                    revision=commit,
                    cache_dir=cache,
                    allow_patterns=list(ADAPTER_FILES),
                    local_files_only=True,
                )
                return Path(found)
            except LocalEntryNotFoundError:
                continue
        if commit is None:  # offline or the hub unreachable: only what is cached can be served
            raise self._not_found(ref, "not in the local hub cache")
        logger.info("downloading hub adapter %s@%s", ref, commit)
        try:
            found = snapshot_download(
                ref.name, revision=commit, cache_dir=ours, allow_patterns=list(ADAPTER_FILES), token=token
            )
        except HfHubHTTPError as e:
            raise self._not_found(ref, f"download refused: {e}") from None
        except Exception as e:
            logger.warning("downloading %s failed: %s: %s", ref, type(e).__name__, e)
            raise AdapterError(f"adapter {ref} cannot be downloaded now; try again") from None
        return Path(found)

    # ---- s3 -------------------------------------------------------------------------------------

    def _s3(self, ref: AdapterRef, folder: Path) -> Fetched:
        """s3://bucket/prefix, downloaded once with the server's credentials (boto3 reads them and
        AWS_ENDPOINT_URL from the environment)."""
        if not (folder / "adapter_config.json").exists():
            self._download_s3(ref, folder)
        if not is_within(folder.resolve(), self.disk.root.resolve()):
            raise self._not_found(ref, "download folder escapes the cache")
        return Fetched(
            f"s3:{ref.name}", find_adapter_files(folder, folder.resolve(), self.options.max_adapter_bytes)
        )

    def _download_s3(self, ref: AdapterRef, folder: Path) -> None:
        try:
            import boto3
            from botocore.config import Config
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError:
            raise AdapterError("s3 adapters need boto3: pip install 'loraxpy[s3]'") from None
        client = boto3.client(
            "s3", config=Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 2})
        )
        try:
            sizes = self._s3_listing(client, ref)
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=folder.parent))
            try:
                for name in sizes:
                    body = client.get_object(Bucket=ref.bucket, Key=f"{ref.prefix}/{name}")["Body"]
                    _copy_capped(body, tmp / name, self.options.max_adapter_bytes)
                try:
                    os.replace(tmp, folder)  # atomic; refused if another load got there first
                except OSError:
                    if not (folder / "adapter_config.json").exists():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except ClientError as e:
            raise self._not_found(ref, f"S3 answered {e.response.get('Error', {}).get('Code')}") from None
        except BotoCoreError as e:
            logger.warning("fetching %s failed: %s: %s", ref, type(e).__name__, e)
            raise AdapterError(f"s3 adapter {ref} cannot be fetched now; try again") from None

    def _s3_listing(self, client: Any, ref: AdapterRef) -> dict[str, int]:
        """The adapter's files directly under the prefix (not in sub-folders), with their sizes."""
        listing = client.list_objects_v2(Bucket=ref.bucket, Prefix=ref.prefix + "/", Delimiter="/")
        sizes = {}
        for o in listing.get("Contents", []):
            name = o["Key"][len(ref.prefix) + 1 :]
            if name in ADAPTER_FILES:
                sizes[name] = int(o.get("Size", 0))
        if "adapter_config.json" not in sizes:
            raise self._not_found(ref, "no adapter_config.json under that prefix")
        if sum(sizes.values()) > self.options.max_adapter_bytes:
            raise AdapterError(
                f"s3 adapter {ref} has {sum(sizes.values())} bytes of files; this server takes at most "
                f"{self.options.max_adapter_bytes} (--max-adapter-size-mib)"
            )
        return sizes


def _copy_capped(body: Any, target: Path, max_bytes: int) -> None:
    """Streams an object to `target`, refusing it past `max_bytes` whatever its listing said."""
    written = 0
    with open(target, "wb") as f:
        for chunk in body.iter_chunks(1 << 20):
            written += len(chunk)
            if written > max_bytes:
                raise AdapterError(f"adapter file {target.name} is larger than {max_bytes} bytes")
            f.write(chunk)
