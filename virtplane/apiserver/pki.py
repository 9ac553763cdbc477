"""The cluster's CA, the API server's serving certificate, and the admin kubeconfig."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import ipaddress
import os
import socket
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclasses.dataclass(frozen=True, slots=True)
class ServingCert:
    ca_cert: Path
    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ensure_pki(pki_dir: Path, extra_sans: list[str] | tuple[str, ...] = ()) -> ServingCert:
    """Create a CA and a serving certificate once; reuse them on every restart.

    The serving certificate is re-issued (by the same CA, so kubeconfigs stay valid) when a
    requested SAN is missing from it, e.g. when a node namespace address is added.
    """
    pki_dir.mkdir(parents=True, exist_ok=True)
    ca_cert_p, ca_key_p = pki_dir / "ca.crt", pki_dir / "ca.key"
    cert_p, key_p = pki_dir / "apiserver.crt", pki_dir / "apiserver.key"
    now = datetime.datetime.now(datetime.UTC)
    if not ca_cert_p.exists() or not ca_key_p.exists():
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "virtplane-ca")])
        ca = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(ca_key_p, _key_pem(ca_key))
        ca_cert_p.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    ca_cert = x509.load_pem_x509_certificate(ca_cert_p.read_bytes())
    ca_key_loaded = serialization.load_pem_private_key(ca_key_p.read_bytes(), None)
    assert isinstance(ca_key_loaded, ec.EllipticCurvePrivateKey)

    wanted = {"localhost", "127.0.0.1", "::1", socket.gethostname(), "kubernetes", "kubernetes.default",
              *extra_sans}
    if cert_p.exists() and key_p.exists():
        existing = x509.load_pem_x509_certificate(cert_p.read_bytes())
        san = existing.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        have = {str(v) for v in san.get_values_for_type(x509.DNSName)}
        have |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
        if wanted <= have and existing.not_valid_after_utc > now + datetime.timedelta(days=30):
            return ServingCert(ca_cert_p, cert_p, key_p)
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for s in sorted(wanted):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(s)))
        except ValueError:
            alt.append(x509.DNSName(s))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "virtplane-apiserver")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key_loaded, hashes.SHA256())
    )
    _write_private(key_p, _key_pem(key))
    cert_p.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ServingCert(ca_cert_p, cert_p, key_p)


def write_kubeconfig(path: Path, server_url: str, ca_cert: Path, token: str, *, name: str = "virtplane") -> None:
    import base64

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {
            "server": server_url,
            "certificate-authority-data": base64.b64encode(ca_cert.read_bytes()).decode(),
        }}],
        "users": [{"name": f"{name}-admin", "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": f"{name}-admin",
                                                  "namespace": "default"}}],
        "current-context": name,
        "preferences": {},
    }
    tmp = path.with_suffix(".tmp")
    _write_private(tmp, yaml.safe_dump(config, sort_keys=False).encode())
    tmp.replace(path)


def ca_cert_hash(ca_pem: bytes) -> str:
    """kubeadm's `--discovery-token-ca-cert-hash`: sha256 of the CA certificate's SubjectPublicKeyInfo (DER), so
    a joining node can trust the CA it was handed by an unauthenticated fetch."""
    cert = x509.load_pem_x509_certificate(ca_pem)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(spki).hexdigest()
