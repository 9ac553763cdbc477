"""Bootstrap tokens (kubeadm's `<id>.<secret>` backed by a kube-system Secret) and the CA hash a joining node
pins: the hash agrees with what openssl computes from the certificate, the way kubeadm documents it."""

from __future__ import annotations

import base64
import datetime
import subprocess
from pathlib import Path

import pytest

from virtplane.apiserver import auth, pki

NOW = datetime.datetime(2026, 12, 7, 12, 0, tzinfo=datetime.UTC)


def secret(token: str, **extra: str) -> dict:
    token_id, token_secret = token.split(".")
    data = {"token-id": token_id, "token-secret": token_secret, "usage-bootstrap-authentication": "true", **extra}
    return {"type": auth.BOOTSTRAP_SECRET_TYPE,
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def test_a_valid_token_is_a_node_component() -> None:
    token = auth.new_bootstrap_token()
    assert auth.BOOTSTRAP_TOKEN_RE.match(token)
    user = auth.bootstrap_user(token, secret(token), NOW)
    assert user is not None and user.name == f"system:bootstrap:{token.split('.')[0]}"
    assert auth.COMPONENTS_GROUP in user.groups and "system:bootstrappers" in user.groups
    assert auth.bootstrap_user(token, secret(token, expiration="2026-12-07T12:00:01Z"), NOW) is not None
    # stringData (as written by `virtplane token create` when the server keeps it) works too
    sd = {"type": auth.BOOTSTRAP_SECRET_TYPE, "stringData": {"token-id": token[:6], "token-secret": token[7:],
                                                             "usage-bootstrap-authentication": "true"}}
    assert auth.bootstrap_user(token, sd, NOW) is not None


@pytest.mark.parametrize("case", ["wrong-secret", "expired", "no-usage", "wrong-type", "bad-expiration", "missing",
                                  "malformed"])
def test_tokens_that_do_not_authenticate(case: str) -> None:
    token = "abcdef.0123456789abcdef"
    s: dict | None = secret(token)
    if case == "wrong-secret":
        s = secret("abcdef.ffffffffffffffff")
    elif case == "expired":
        s = secret(token, expiration="2026-12-07T11:59:59Z")
    elif case == "no-usage":
        s = secret(token, **{"usage-bootstrap-authentication": "false"})
    elif case == "wrong-type":
        s["type"] = "Opaque"
    elif case == "bad-expiration":
        s = secret(token, expiration="tomorrow")
    elif case == "missing":
        s = None
    elif case == "malformed":
        token = "ABCDEF.0123456789abcdef"
    assert auth.bootstrap_user(token, s, NOW) is None


def test_ca_hash_matches_openssl(tmp_path: Path) -> None:
    certs = pki.ensure_pki(tmp_path / "pki")
    pem = certs.ca_cert.read_bytes()
    pub = subprocess.run(["openssl", "x509", "-pubkey", "-noout"], input=pem, capture_output=True, check=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=pub, capture_output=True,
                         check=True).stdout
    digest = subprocess.run(["openssl", "dgst", "-sha256", "-hex"], input=der, capture_output=True, check=True,
                            text=False).stdout.decode().split("= ")[-1].strip()
    assert pki.ca_cert_hash(pem) == f"sha256:{digest}"
