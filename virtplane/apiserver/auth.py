"""Bearer-token authentication from a Kubernetes static token file (token,user,uid,"groups"), and
Kubernetes bootstrap tokens (`<id>.<secret>`, a Secret `kube-system/bootstrap-token-<id>`) for node joins.

Authorization is a seam: `Authorizer.allowed` says yes to every authenticated user today; the
RBAC work replaces it without touching the handlers.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import datetime
import hmac
import io
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path


@dataclasses.dataclass(frozen=True, slots=True)
class User:
    name: str
    uid: str = ""
    groups: tuple[str, ...] = ()


ANONYMOUS = User("system:anonymous", groups=("system:unauthenticated",))


class TokenAuthenticator:
    def __init__(self, tokens: dict[str, User]) -> None:
        self._tokens = tokens

    @classmethod
    def from_file(cls, path: Path) -> TokenAuthenticator:
        tokens: dict[str, User] = {}
        for row in csv.reader(io.StringIO(path.read_text())):
            if len(row) < 2 or row[0].startswith("#"):
                continue
            groups = tuple(g for g in (row[3] if len(row) > 3 else "").split(",") if g)
            tokens[row[0]] = User(row[1], row[2] if len(row) > 2 else "", groups)
        return cls(tokens)

    def authenticate(self, authorization: str | None) -> User | None:
        if not authorization or not authorization.startswith("Bearer "):
            return None
        token = authorization[len("Bearer "):].strip()
        for known, user in self._tokens.items():
            if hmac.compare_digest(known, token):
                return user
        return None


# virtplane's own components (controllers, node agents): admission lets them write what users
# may not (e.g. a VMI's spec after creation, reserved kubevirt.io labels).
COMPONENTS_GROUP = "system:virtplane-components"


# Kubernetes bootstrap tokens (kubeadm token create): `[a-z0-9]{6}.[a-z0-9]{16}`, kept as a Secret of this
# type in kube-system; a node joining with one (`virtplane node --server --token`) uses it as its credential
# from then on (there is no certificate signing step), so deleting the Secret, or its expiration, revokes it.
BOOTSTRAP_TOKEN_RE = re.compile(r"^([a-z0-9]{6})\.([a-z0-9]{16})$")
BOOTSTRAP_SECRET_TYPE = "bootstrap.kubernetes.io/token"
BOOTSTRAP_GROUPS = ("system:bootstrappers", "system:nodes", COMPONENTS_GROUP)


def bootstrap_secret_name(token_id: str) -> str:
    return f"bootstrap-token-{token_id}"


def new_bootstrap_token() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(6)) + "." + \
        "".join(secrets.choice(alphabet) for _ in range(16))


def _secret_field(secret: Mapping[str, object], key: str) -> str | None:
    string_data = secret.get("stringData")
    if isinstance(string_data, Mapping) and isinstance(string_data.get(key), str):
        return str(string_data[key])
    data = secret.get("data")
    if isinstance(data, Mapping) and isinstance(data.get(key), str):
        try:
            return base64.b64decode(str(data[key])).decode()
        except ValueError:
            return None
    return None


def bootstrap_user(token: str, secret: Mapping[str, object] | None, now: datetime.datetime) -> User | None:
    """The user a bootstrap token stands for, when `secret` (its kube-system Secret) vouches for it: the right
    type, `usage-bootstrap-authentication: "true"`, the same secret half, not expired."""
    m = BOOTSTRAP_TOKEN_RE.match(token)
    if m is None or secret is None or secret.get("type") != BOOTSTRAP_SECRET_TYPE:
        return None
    if _secret_field(secret, "usage-bootstrap-authentication") != "true":
        return None
    if _secret_field(secret, "token-id") != m.group(1):
        return None
    if not hmac.compare_digest(_secret_field(secret, "token-secret") or "", m.group(2)):
        return None
    expiration = _secret_field(secret, "expiration")
    if expiration:
        try:
            if datetime.datetime.fromisoformat(expiration.replace("Z", "+00:00")) <= now:
                return None
        except ValueError:
            return None  # an unreadable expiration is not "never"
    return User(f"system:bootstrap:{m.group(1)}", groups=BOOTSTRAP_GROUPS)


# Browsers cannot set headers on a websocket, so kube-apiserver also reads the bearer token from a
# subprotocol offered beside the real one (client-go and the OpenShift console use it the same way).
WEBSOCKET_TOKEN_PROTOCOL = "base64url.bearer.authorization.k8s.io."


def websocket_bearer(headers: Mapping[str, str]) -> str | None:
    """'Bearer <token>' from a websocket upgrade's `base64url.bearer.authorization.k8s.io.<b64url>` protocol."""
    if headers.get("Upgrade", "").lower() != "websocket":
        return None
    for proto in headers.get("Sec-WebSocket-Protocol", "").split(","):
        proto = proto.strip()
        if proto.startswith(WEBSOCKET_TOKEN_PROTOCOL):
            encoded = proto[len(WEBSOCKET_TOKEN_PROTOCOL):]
            try:
                token = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except ValueError:  # binascii.Error, non-ASCII input, bad UTF-8
                return None
            return f"Bearer {token}"
    return None


def ensure_token(path: Path, user: str, groups: tuple[str, ...]) -> str:
    """Return `user`'s token from the static token file, adding one on first use."""
    if path.exists():
        for row in csv.reader(io.StringIO(path.read_text())):
            if len(row) >= 2 and row[1] == user:
                return row[0]
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f'{token},{user},{user}-uid,"{",".join((*groups, "system:authenticated"))}"\n')
    return token


def ensure_admin_token(path: Path) -> str:
    return ensure_token(path, "admin", ("system:masters",))


def is_component(user: User) -> bool:
    return COMPONENTS_GROUP in user.groups


class Authorizer:
    def allowed(self, user: User, verb: str, group: str, resource: str, namespace: str | None) -> bool:
        return user is not ANONYMOUS
