"""Which adapters requests may name, and with whose credentials they are read: the operator's policy.

Router and workers both import this (no torch): the router refuses early and keys its registry by
an adapter's canonical name, and every worker enforces the same policy again where it reads
weights, because that is where the server's own credentials are. Also the operator's adapter
flags that the launcher hands its shards, declared once here.

A canonical name is purely syntactic (`./x`, `x/`, `x/.` are all `x`); the worker resolves it to an
identity (a real path, a hub repo at a commit, a bucket and key) and authorizes that.
"""

from __future__ import annotations

import argparse
import posixpath
import re
from dataclasses import dataclass

from loraxpy.proto.settings import add_flags, flag_values, to_argv

SOURCES = ("hub", "local", "s3")
_HUB_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
MAX_ID_CHARS = 1024


def not_found_message(adapter_id: str) -> str:
    """One message for "does not exist" and "not yours", so a refusal tells nothing about others'."""
    return f"adapter {adapter_id!r} not found, or not available to this request"


class AdapterIdError(ValueError):
    """The id cannot name an adapter of its source (the message is safe to show the requester)."""


class SourceNotAllowedError(ValueError):
    """The operator did not allow requests to use this adapter source."""


class AdapterNotAllowedError(ValueError):
    """The policy refuses this adapter; answered exactly like an adapter that does not exist."""


@dataclass(frozen=True)
class AdapterRef:
    """An adapter as a request names it, in canonical form: `name` is the same for every spelling."""

    source: str
    name: str  # local: a normalized path; hub: org/repo; s3: bucket/key-prefix (no scheme)

    @classmethod
    def parse(cls, adapter_id: str, source: str) -> AdapterRef:
        if source not in SOURCES:
            raise AdapterIdError(f"adapter source {source!r} is not one of {', '.join(SOURCES)}")
        if not adapter_id or len(adapter_id) > MAX_ID_CHARS or not adapter_id.isprintable():
            raise AdapterIdError(f"adapter ids are 1 to {MAX_ID_CHARS} printable characters")
        parse = {"local": _local_name, "hub": _hub_name, "s3": _s3_name}[source]
        return cls(source, parse(adapter_id))

    @property
    def bucket(self) -> str:
        return self.name.partition("/")[0]

    @property
    def prefix(self) -> str:
        return self.name.partition("/")[2]

    def __str__(self) -> str:
        return f"s3://{self.name}" if self.source == "s3" else self.name


def _local_name(adapter_id: str) -> str:
    # Lexical only: the worker resolves symlinks and confines the result to --adapter-root.
    name = posixpath.normpath(adapter_id)
    if name in (".", "/"):
        raise AdapterIdError(f"{adapter_id!r} names no adapter folder")
    return name


def _hub_name(adapter_id: str) -> str:
    """`org/repo` or `repo`, as the hub spells repo ids; `./`, trailing `/` and `/.` are dropped."""
    name = posixpath.normpath(adapter_id)
    parts = name.split("/")
    if len(parts) > 2 or not all(_HUB_PART.fullmatch(p) and ".." not in p and "--" not in p for p in parts):
        raise AdapterIdError(f"{adapter_id!r} is not a hub repo id (org/name)")
    return name


def _s3_name(adapter_id: str) -> str:
    """`bucket/key/prefix`: no empty, `.` or `..` segments, which would map two keys to one folder."""
    bucket, _, prefix = adapter_id.removeprefix("s3://").partition("/")
    segments = prefix.removesuffix("/").split("/")
    if not _BUCKET.fullmatch(bucket) or not all(s not in ("", ".", "..") for s in segments):
        raise AdapterIdError(f"s3 adapter id {adapter_id!r} must look like s3://bucket/path/to/adapter")
    return f"{bucket}/{'/'.join(segments)}"


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@dataclass(frozen=True)
class AdapterPolicy:
    """What requests may use. Hub adapters are read with the requester's own `api_token` (or
    anonymously) unless the operator allows the repo, which then is read with the server's token —
    and, offline, from the local hub cache, where no requester's access can be checked. S3 has no
    per-request credential, so only the buckets the operator lists are read."""

    sources: frozenset[str] = frozenset(SOURCES)
    hub_allowed: tuple[str, ...] = ()  # "org" (every repo in it), "org/repo", or "*"
    s3_buckets: tuple[str, ...] = ()  # bucket names, or "*": any bucket the server's credentials read

    def check(self, ref: AdapterRef) -> None:
        """Raises SourceNotAllowedError or AdapterNotAllowedError; the router and the workers both call it."""
        if ref.source not in self.sources:
            allowed = ", ".join(sorted(self.sources)) or "none"
            raise SourceNotAllowedError(
                f"adapter_source {ref.source!r} is not enabled here (allowed: {allowed})"
            )
        if ref.source == "s3" and "*" not in self.s3_buckets and ref.bucket not in self.s3_buckets:
            raise AdapterNotAllowedError(f"s3 bucket {ref.bucket!r} is not in --allowed-s3-buckets")

    def is_operators(self, ref: AdapterRef) -> bool:
        """The operator vouches for this adapter: anyone may use it, with the server's credentials."""
        if ref.source != "hub":
            return True  # local and s3 adapters are the operator's (`check` confines them)
        org = ref.name.partition("/")[0] if "/" in ref.name else None
        return any(a == "*" or a == ref.name or (org is not None and a == org) for a in self.hub_allowed)


@dataclass(frozen=True)
class AdapterSettings:
    """The operator's adapter-security flags: the same names on lorax-launcher, lorax-router and
    lorax-worker; the launcher hands them to its shards with `to_argv`."""

    # Comma-separated sources requests may use; empty: the router's --adapter-source only (a
    # worker alone: all, each still gated by the flags below and --adapter-root).
    allowed_adapter_sources: str = ""
    allowed_hub_adapters: str = ""  # hub orgs / org/repo read with HF_TOKEN (and offline); "*": all
    allowed_s3_buckets: str = ""  # buckets s3 adapters may come from; "*": any
    max_adapter_size_mib: int = 0  # one adapter's files; 0: the largest --max-lora-rank allows
    adapter_disk_cache_mib: int = 20480  # downloaded (hub, s3) adapters on disk, LRU by bytes
    adapter_load_timeout_s: float = 300.0  # one fetch and parse on a worker
    max_concurrent_adapter_loads: int = 2  # per worker; as many more may wait, the rest are refused

    def __post_init__(self) -> None:
        unknown = set(_csv(self.allowed_adapter_sources)) - set(SOURCES)
        if unknown:
            raise ValueError(
                f"--allowed-adapter-sources: {', '.join(sorted(unknown))} is not one of hub, local, s3"
            )
        if self.max_adapter_size_mib < 0 or self.adapter_disk_cache_mib < 1:
            raise ValueError("--max-adapter-size-mib must be >= 0 and --adapter-disk-cache-mib positive")
        if not 0 < self.adapter_load_timeout_s <= 3600:
            raise ValueError("--adapter-load-timeout-s must be in (0, 3600] seconds")
        if not 1 <= self.max_concurrent_adapter_loads <= 3:
            # Each running or waiting load holds one of the worker's 8 gRPC threads (twice this
            # many at most): Step and Health must always find one free.
            raise ValueError("--max-concurrent-adapter-loads must be in [1, 3]")

    def policy(self, default_source: str | None = None) -> AdapterPolicy:
        """The policy; with `default_source` (the router's --adapter-source), requests are pinned to
        it unless --allowed-adapter-sources says otherwise."""
        sources = _csv(self.allowed_adapter_sources) or ((default_source,) if default_source else SOURCES)
        return AdapterPolicy(
            frozenset(sources), _csv(self.allowed_hub_adapters), _csv(self.allowed_s3_buckets)
        )

    def to_argv(self) -> list[str]:
        return to_argv(self)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Adds each field as `--field-name`, defaulting to the environment variable FIELD_NAME."""
        add_flags(parser, AdapterSettings)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AdapterSettings:
        return cls(**flag_values(cls, args))
