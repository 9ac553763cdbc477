"""Bearer-token authentication from a Kubernetes static token file (token,user,uid,"groups"), Kubernetes
bootstrap tokens (`<id>.<secret>`, a Secret `kube-system/bootstrap-token-<id>`) for node joins, and signed
tokens (HS256 JWTs: ServiceAccount tokens from the TokenRequest API, `virtplane user add` tokens) whose key
every API server reads from the store. Every authenticated user is in `system:authenticated`.

Authorization is the `Authorizer` seam: `authorize(user, Attributes)` (kube-apiserver's authorizer
attributes); virtplane.apiserver.rbac implements it with Kubernetes RBAC. Users in `SUPERUSER_GROUPS`
(`system:masters`, virtplane's components) are allowed before any rule is looked at.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import datetime
import hashlib
import hmac
import io
import os
import re
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson


@dataclasses.dataclass(frozen=True, slots=True)
class User:
    name: str
    uid: str = ""
    groups: tuple[str, ...] = ()


ANONYMOUS = User("system:anonymous", groups=("system:unauthenticated",))
AUTHENTICATED = "system:authenticated"
MASTERS = "system:masters"


def authenticated(name: str, uid: str = "", groups: tuple[str, ...] = ()) -> User:
    """A User as kube-apiserver's authenticators hand it on: always in system:authenticated."""
    return User(name, uid, groups if AUTHENTICATED in groups else (*groups, AUTHENTICATED))


def _read_token_file(path: Path) -> dict[str, User]:
    tokens: dict[str, User] = {}
    for row in csv.reader(io.StringIO(path.read_text())):
        if len(row) < 2 or row[0].startswith("#"):
            continue
        groups = tuple(g for g in (row[3] if len(row) > 3 else "").split(",") if g)
        tokens[row[0]] = authenticated(row[1], row[2] if len(row) > 2 else "", groups)
    return tokens


class TokenAuthenticator:
    """The static token file. A token not found makes it look at the file again (at most once a second, and
    only when the file changed), so `virtplane user add` needs no restart."""

    def __init__(self, tokens: dict[str, User], path: Path | None = None) -> None:
        self._tokens = tokens
        self._path = path
        self._mtime = path.stat().st_mtime_ns if path is not None and path.exists() else 0
        self._checked = time.monotonic()

    @classmethod
    def from_file(cls, path: Path) -> TokenAuthenticator:
        return cls(_read_token_file(path), path)

    def _lookup(self, token: str) -> User | None:
        for known, user in self._tokens.items():
            if hmac.compare_digest(known, token):
                return user
        return None

    def authenticate(self, authorization: str | None) -> User | None:
        if not authorization or not authorization.startswith("Bearer "):
            return None
        token = authorization[len("Bearer "):].strip()
        user = self._lookup(token)
        if user is None and self._path is not None and time.monotonic() - self._checked >= 1.0:
            self._checked = time.monotonic()
            try:
                mtime = self._path.stat().st_mtime_ns
                if mtime != self._mtime:
                    self._tokens, self._mtime = _read_token_file(self._path), mtime
                    user = self._lookup(token)
            except OSError:
                pass
        return user


# virtplane's own components (controllers, node agents): admission lets them write what users
# may not (e.g. a VMI's spec after creation, reserved kubevirt.io labels).
COMPONENTS_GROUP = "system:virtplane-components"


# Kubernetes bootstrap tokens (kubeadm token create): `[a-z0-9]{6}.[a-z0-9]{16}`, kept as a Secret of this
# type in kube-system; a node joining with one (`virtplane node --server --token`) uses it as its credential
# from then on (there is no certificate signing step), so deleting the Secret, or its expiration, revokes it.
BOOTSTRAP_TOKEN_RE = re.compile(r"^([a-z0-9]{6})\.([a-z0-9]{16})$")
BOOTSTRAP_SECRET_TYPE = "bootstrap.kubernetes.io/token"
BOOTSTRAP_GROUPS = ("system:bootstrappers", "system:nodes", COMPONENTS_GROUP, AUTHENTICATED)


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
        f.write(f'{token},{user},{user}-uid,"{",".join((*groups, AUTHENTICATED))}"\n')
    return token


def ensure_admin_token(path: Path) -> str:
    return ensure_token(path, "admin", (MASTERS,))


def is_component(user: User) -> bool:
    return COMPONENTS_GROUP in user.groups


# --------------------------------------------------------------------------------------------------
# Signed tokens: HS256 JWTs with the key of the Secret kube-system/virtplane-token-signing-key, so every API
# server over one store accepts the tokens any of them issued. Deleting that Secret (and restarting the API
# servers) revokes every such token at once; each also carries its expiry.

SIGNING_KEY_SECRET = ("kube-system", "virtplane-token-signing-key")
TOKEN_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_JWT_HEADER = _b64(orjson.dumps({"alg": "HS256", "typ": "JWT"}))


def sign_token(key: bytes, claims: Mapping[str, Any]) -> str:
    body = f"{_JWT_HEADER}.{_b64(orjson.dumps(dict(claims)))}"
    return f"{body}.{_b64(hmac.new(key, body.encode(), hashlib.sha256).digest())}"


def verify_token(key: bytes, token: str, now: float) -> dict[str, Any] | None:
    """The claims of a token this key signed that has not expired; None otherwise."""
    parts = token.split(".")
    if len(parts) != 3 or not key:
        return None
    expected = hmac.new(key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    try:
        if not hmac.compare_digest(expected, _unb64(parts[2])) or parts[0] != _JWT_HEADER:
            return None
        claims = orjson.loads(_unb64(parts[1]))
    except (ValueError, orjson.JSONDecodeError):
        return None
    if not isinstance(claims, dict) or not isinstance(claims.get("sub"), str):
        return None
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or exp <= now:
        return None
    return claims


def service_account_user(namespace: str, name: str, uid: str = "") -> User:
    return User(f"{SERVICE_ACCOUNT_PREFIX}{namespace}:{name}", uid,
                ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", AUTHENTICATED))


def service_account_claims(namespace: str, name: str, uid: str, expiration_seconds: int, now: float,
                           audiences: list[str] | None = None) -> dict[str, Any]:
    """Claims of a TokenRequest token, in Kubernetes' shape (`kubernetes.io.serviceaccount`)."""
    iat = int(now)
    return {"iss": TOKEN_ISSUER, "aud": audiences or [TOKEN_ISSUER],
            "sub": f"{SERVICE_ACCOUNT_PREFIX}{namespace}:{name}",
            "iat": iat, "nbf": iat, "exp": iat + expiration_seconds, "jti": secrets.token_hex(8),
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": uid}}}


def user_claims(name: str, groups: tuple[str, ...], expiration_seconds: int, now: float) -> dict[str, Any]:
    """Claims of a `virtplane user add` token: a person's name and groups, like a client certificate's CN/O."""
    iat = int(now)
    return {"iss": TOKEN_ISSUER, "sub": name, "groups": list(groups), "iat": iat, "exp": iat + expiration_seconds,
            "jti": secrets.token_hex(8), "virtplane.io/user": True}


def user_from_claims(claims: Mapping[str, Any]) -> tuple[User, tuple[str, str, str] | None]:
    """The user a verified token stands for, and for a ServiceAccount token (namespace, name, uid) to check
    that the ServiceAccount still exists."""
    sa = (claims.get("kubernetes.io") or {}).get("serviceaccount") if isinstance(claims.get("kubernetes.io"),
                                                                                  dict) else None
    if isinstance(sa, dict):
        ns = str(claims["kubernetes.io"].get("namespace") or "")
        return service_account_user(ns, str(sa.get("name") or ""), str(sa.get("uid") or "")), \
            (ns, str(sa.get("name") or ""), str(sa.get("uid") or ""))
    groups = tuple(str(g) for g in claims.get("groups") or () if isinstance(g, str))
    return authenticated(str(claims["sub"]), "", groups), None


# --------------------------------------------------------------------------------------------------
# Authorization


# Allowed before any rule is evaluated (one set-membership test on the hot path): kube-apiserver's
# privileged group, and virtplane's components (controllers, node agents), which act for every user.
SUPERUSER_GROUPS = frozenset({MASTERS, COMPONENTS_GROUP})


def is_superuser(user: User) -> bool:
    return not SUPERUSER_GROUPS.isdisjoint(user.groups)


@dataclasses.dataclass(frozen=True, slots=True)
class Attributes:
    """kube-apiserver's authorizer.Attributes (without the user): a resource request names group, resource,
    subresource, namespace and name; a non-resource request a path. `verb` is the API verb (get, list,
    watch, create, update, patch, delete, deletecollection, or a custom one like impersonate) or, for a
    non-resource request, the lower-case HTTP method."""

    verb: str
    resource_request: bool = True
    group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    path: str = ""


class Authorizer:
    """The seam the handlers ask; the API server installs the RBAC authorizer (virtplane.apiserver.rbac)."""

    def authorize(self, user: User, attrs: Attributes) -> bool:
        return is_superuser(user)

    def allowed(self, user: User, verb: str, group: str, resource: str, namespace: str | None) -> bool:
        """`resource` may carry a subresource (`datavolumes/source`)."""
        res, _, sub = resource.partition("/")
        return self.authorize(user, Attributes(verb, True, group, res, sub, namespace or ""))
