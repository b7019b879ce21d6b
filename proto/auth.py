"""Who may call a worker: a shared secret in every call's metadata, and optional (mutual) TLS.

Both ends of the router↔worker link live here (no torch: the router imports this too): how a
secret is read and checked, the metadata the router's client sends, the server interceptor that
refuses any worker RPC without it, and the TLS credentials of either side.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

logger = logging.getLogger(__name__)

METADATA_KEY = "authorization"
MIN_SECRET_LEN = 16
# What a refused caller learns: nothing about why (missing, wrong, duplicated) or what it asked for.
REFUSAL = "unauthenticated"
REFUSAL_LOG_INTERVAL_S = 10.0


class SecretError(ValueError):
    """The configured secret cannot be used (both sources set, unreadable, too short, not ASCII)."""


def new_secret() -> str:
    """A fresh random secret (256 bits), as the launcher makes one per launch for its own shards."""
    return secrets.token_urlsafe(32)


def read_secret(value: str | None, path: str | Path | None) -> str | None:
    """The secret from its environment value or its file (surrounding whitespace stripped, so a file
    ending in a newline works); None when neither is set. Never a flag's value: `ps` shows those."""
    if value and path:
        raise SecretError("set the worker secret once: WORKER_SECRET or --worker-secret-file, not both")
    if path:
        try:
            value = Path(path).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise SecretError(f"cannot read the worker secret file {path}: {type(e).__name__}") from e
        if not value:
            raise SecretError(f"the worker secret file {path} is empty")
    if not value:
        return None
    # It travels as a gRPC header value: printable ASCII only.
    if len(value) < MIN_SECRET_LEN or not (value.isascii() and value.isprintable()) or " " in value:
        raise SecretError(
            f"the worker secret must be at least {MIN_SECRET_LEN} printable ASCII characters without spaces"
        )
    return value


class RefusedOnCommandLine(argparse.Action):
    """`--worker-secret VALUE` is refused (instead of argparse taking it for `--worker-secret-file`,
    its prefix, and printing the secret as a missing file's name)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, default=argparse.SUPPRESS)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        parser.error(
            "the worker secret is not taken on the command line, where `ps` shows it: "
            "set WORKER_SECRET or --worker-secret-file"
        )


def call_metadata(secret: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata every call to a worker carries."""
    return ((METADATA_KEY, f"Bearer {secret}"),) if secret else ()


def _digest(value: str) -> bytes:
    # Comparing digests keeps the comparison's time independent of the secret's length, too.
    return hashlib.sha256(value.encode()).digest()


class SecretInterceptor(grpc.ServerInterceptor):
    """Refuses every RPC (unknown methods included) whose metadata lacks `Bearer <secret>` exactly
    once, with UNAUTHENTICATED and no detail, before the request is even deserialized."""

    def __init__(self, secret: str) -> None:
        self._expected = _digest(f"Bearer {secret}")
        self._refuse = grpc.unary_unary_rpc_method_handler(self._unauthenticated)
        self._log_lock = threading.Lock()
        self._num_refused = 0
        self._last_log = float("-inf")

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        if self.is_authorized(details.invocation_metadata or ()):
            return continuation(details)
        return self._refuse

    def is_authorized(self, metadata: Sequence[tuple[str, str | bytes]]) -> bool:
        values = [v for k, v in metadata if k == METADATA_KEY]
        if len(values) != 1 or not isinstance(values[0], str):
            return False
        return hmac.compare_digest(_digest(values[0]), self._expected)

    def _unauthenticated(self, request: bytes, context: grpc.ServicerContext) -> None:
        self._log_refusal(context.peer())
        context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)

    def _log_refusal(self, peer: str) -> None:
        """At most one line per interval, so a caller cannot flood the log."""
        with self._log_lock:
            self._num_refused += 1
            now = time.monotonic()
            if now - self._last_log < REFUSAL_LOG_INTERVAL_S:
                return
            count, self._num_refused, self._last_log = self._num_refused, 0, now
        logger.warning("refused %d call(s) without the worker secret; latest from %s", count, peer)


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def server_credentials(
    cert_file: str | Path, key_file: str | Path, client_ca_file: str | Path | None = None
) -> grpc.ServerCredentials:
    """The worker's TLS identity; with a client CA, only clients holding a certificate it signed
    may connect (mutual TLS)."""
    cert, key = _read(cert_file), _read(key_file)
    assert cert is not None and key is not None
    client_ca = _read(client_ca_file)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(
    ca_file: str | Path | None, cert_file: str | Path | None = None, key_file: str | Path | None = None
) -> grpc.ChannelCredentials:
    """The router's side of TLS: the CA that signed the workers' certificates (None: the system's
    roots) and, for mutual TLS, the router's own certificate and key."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file), private_key=_read(key_file), certificate_chain=_read(cert_file)
    )
