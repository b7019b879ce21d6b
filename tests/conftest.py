"""Session fixtures shared by unit and integration tests."""

from __future__ import annotations

import datetime
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# The top-level folders are imported as `loraxpy.*`; `python -m pytest` run from the repository
# root also puts the root on sys.path, where kernels/ shadows Hugging Face's `kernels` package
# (transformers 5.25 requires it and imports it with its models). Drop the root here, and
# PYTHONSAFEPATH keeps it off the path of every `python -m ...` / `python -c` the tests start.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
os.environ["PYTHONSAFEPATH"] = "1"

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. Triton reads this when
# `triton.language` is first imported, so it is set before any test module can import it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def default_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged SmolLM2-135M-Instruct converted to an HF folder (once; reused via $LORAX_CACHE)."""
    from loraxpy.worker.model_source import convert_default_model

    cache = os.environ.get("LORAX_CACHE")
    cache_dir = Path(cache).expanduser() if cache else tmp_path_factory.mktemp("lorax-cache")
    return convert_default_model(cache_dir)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a throwaway CA, a worker certificate it signed (localhost, 127.0.0.1) and a
    client certificate it signed (the router's, for mutual TLS)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    pytest.importorskip("cryptography", reason="cryptography (the dev extra) makes the test certificates")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(name: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, extensions: list):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        issuer_name, signer = issuer or (subject, key)
        builder = x509.CertificateBuilder(
            subject_name=subject,
            issuer_name=issuer_name,
            public_key=key.public_key(),
            serial_number=x509.random_serial_number(),
            not_valid_before=now - datetime.timedelta(minutes=5),
            not_valid_after=now + datetime.timedelta(days=1),
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        cert = builder.sign(signer, hashes.SHA256())
        (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem_key = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (folder / f"{name}.key").write_bytes(pem_key)
        return subject, key

    ca = issue("ca", None, [(x509.BasicConstraints(ca=True, path_length=None), True)])
    leaf = (x509.BasicConstraints(ca=False, path_length=None), True)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server_usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    issue("worker", ca, [leaf, (x509.SubjectAlternativeName(names), False), (server_usage, False)])
    client_usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    issue("router", ca, [leaf, (client_usage, False)])
    return TlsFiles(
        folder / "ca.crt",
        folder / "worker.crt",
        folder / "worker.key",
        folder / "router.crt",
        folder / "router.key",
    )
