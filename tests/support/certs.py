"""TLS material for tests, made with ``cryptography``.

``self_signed(tmp_path)`` writes a certificate and key for ``localhost`` and
``127.0.0.1`` (the certificate is its own CA) and returns their paths.
``ca_signed(tmp_path)`` writes a CA and a server certificate it signed.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class CertFiles:
    cert: str
    key: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> CertFiles:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{stem}-cert.pem"
    key_path = directory / f"{stem}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return CertFiles(str(cert_path), str(key_path))


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    ca: bool,
    server: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(subject),
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def self_signed(directory: Path, common_name: str = "localhost") -> CertFiles:
    """A certificate valid for ``localhost`` / ``127.0.0.1``, usable as server, client and CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(common_name, key, common_name, key, ca=True, server=True)
    return _write(directory, common_name, cert, key)


def ca_signed(directory: Path, common_name: str = "localhost") -> tuple[CertFiles, CertFiles]:
    """(CA, server certificate signed by it) for ``localhost`` / ``127.0.0.1``."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("test-ca", ca_key, "test-ca", ca_key, ca=True, server=False)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _certificate(common_name, key, "test-ca", ca_key, ca=False, server=True)
    return _write(directory, "test-ca", ca, ca_key), _write(directory, common_name, leaf, key)
