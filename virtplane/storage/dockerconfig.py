"""Registry credentials from image pull Secrets, matched to an image as the kubelet's keyring does.

A `kubernetes.io/dockerconfigjson` Secret holds `.dockerconfigjson` = `{"auths": {KEY: ENTRY}}`, the legacy
`kubernetes.io/dockercfg` one `.dockercfg` = `{KEY: ENTRY}`. ENTRY has `auth` (base64 `user:password`, which
wins) or `username`/`password`. KEY names a registry the way `docker login` writes it: `host[:port]`, optionally
with a scheme and a path (`https://index.docker.io/v1/`), and may use `*` globs per DNS label
(`*.example.com`).

Matching (k8s.io/kubernetes pkg/credentialprovider keyring.go `URLsMatch`): the ports must be equal (a key
without a port matches only images without one), the host has the same number of labels, each matching its
glob, and the image's repository path starts with the key's path. Docker Hub's keys (`index.docker.io`,
`registry-1.docker.io`, `docker.io`, with any path) match images on `docker.io`. Every matching entry is
returned, most specific key first (the kubelet sorts keys in reverse order); the puller tries each in turn.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
from collections.abc import Iterable, Mapping
from typing import Any

from .oci import DOCKER_HUB, Credentials, Reference

DOCKER_CONFIG_JSON = "kubernetes.io/dockerconfigjson"
DOCKER_CFG = "kubernetes.io/dockercfg"
_HUB_HOSTS = ("index.docker.io", "registry-1.docker.io", "docker.io")


class DockerConfigError(ValueError):
    """A pull Secret whose docker config cannot be read."""


def _entries(secret: Mapping[str, Any]) -> dict[str, Any]:
    stype = secret.get("type")
    data = secret.get("data") or {}
    key = ".dockerconfigjson" if stype == DOCKER_CONFIG_JSON else ".dockercfg" if stype == DOCKER_CFG else None
    if key is None or not data.get(key):
        return {}  # other Secret types are not pull secrets: ignored, as by the kubelet
    try:
        doc = json.loads(base64.b64decode(data[key]))
    except (binascii.Error, ValueError) as err:
        raise DockerConfigError(f"secret {key} is not a docker config: {err}") from None
    if not isinstance(doc, dict):
        raise DockerConfigError(f"secret {key} is not a JSON object")
    auths = doc.get("auths") if key == ".dockerconfigjson" else doc
    return auths if isinstance(auths, dict) else {}


def _credentials(entry: Any) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(str(entry["auth"])).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return Credentials(user, password) if sep else None
    if entry.get("username") is not None or entry.get("password") is not None:
        return Credentials(str(entry.get("username") or ""), str(entry.get("password") or ""))
    return None


def _split_key(key: str) -> tuple[str, str, str]:
    """(host, port, path) of a config key; a scheme is dropped."""
    rest = key.split("://", 1)[1] if "://" in key else key
    hostport, slash, path = rest.partition("/")
    path = slash + path
    if hostport.startswith("["):
        host, _, port = hostport[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = hostport.partition(":")
    return host.lower(), port, path


def _matches(key: str, ref: Reference) -> bool:
    host, port, path = _split_key(key)
    if ref.registry == DOCKER_HUB or host in _HUB_HOSTS:
        return ref.registry == DOCKER_HUB and host in _HUB_HOSTS and not port
    t_host, t_port, _ = _split_key(ref.registry)
    if port != t_port:
        return False
    g_labels, t_labels = host.split("."), t_host.split(".")
    if len(g_labels) != len(t_labels):
        return False
    if not all(fnmatch.fnmatchcase(t, g) for g, t in zip(g_labels, t_labels, strict=True)):
        return False
    return f"/{ref.repository}".startswith(path.rstrip("/")) if path.strip("/") else True


def credentials_for(image: str, secrets: Iterable[Mapping[str, Any]]) -> list[Credentials]:
    """Credentials of every entry of these pull Secrets matching `image`'s registry, most specific key first.

    Secrets are taken in order (the pod's list order); an unreadable Secret raises DockerConfigError."""
    ref = Reference.parse(image)
    found: list[tuple[str, Credentials]] = []
    for secret in secrets:
        for key, entry in _entries(secret).items():
            creds = _credentials(entry)
            if creds is not None and _matches(str(key), ref):
                found.append((str(key), creds))
    found.sort(key=lambda kc: kc[0], reverse=True)  # stable: equal keys keep the Secrets' order
    out: list[Credentials] = []
    for _, c in found:
        if c not in out:
            out.append(c)
    return out
