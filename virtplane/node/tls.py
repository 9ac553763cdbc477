"""The agent's HTTPS serving certificate: self-signed, pinned by the API server through its fingerprint.

The API server learns the SHA-256 of the certificate (DER) from the Node annotation
`virtplane.io/agent-cert-sha256` and pins it, so the agent needs no cluster CA key. The pair is kept in
DATA/pki/ and reused across restarts: the fingerprint stays valid while the agent is down.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALIDITY = datetime.timedelta(days=3650)


@dataclasses.dataclass(frozen=True, slots=True)
class ServingCert:
    cert: Path
    key: Path
    fingerprint: str  # hex sha256 of the DER certificate

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


def fingerprint_of(pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def _sans(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def ensure_serving_cert(directory: Path, common_name: str, names: list[str]) -> ServingCert:
    """Load the pair from `directory`, or create it (ECDSA P-256) when missing or not covering `names`."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = directory / "agent.crt", directory / "agent.key"
    if cert_path.exists() and key_path.exists():
        pem = cert_path.read_bytes()
        cert = x509.load_pem_x509_certificate(pem)
        try:
            have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            covered = all(san in have for san in _sans(names))
        except x509.ExtensionNotFound:
            covered = False
        if covered and cert.not_valid_after_utc > datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1):
            return ServingCert(cert_path, key_path, fingerprint_of(pem))
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_sans(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    fd = os.open(key_path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    os.replace(key_path.with_suffix(".tmp"), key_path)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(pem)
    return ServingCert(cert_path, key_path, fingerprint_of(pem))
