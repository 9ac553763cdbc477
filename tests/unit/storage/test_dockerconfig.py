"""Pull Secrets → registry credentials, matched to images as the kubelet's keyring matches them."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest

from virtplane.api import admission
from virtplane.storage import dockerconfig, oci


def secret(auths: dict[str, Any], *, legacy: bool = False) -> dict[str, Any]:
    if legacy:
        raw, stype, key = json.dumps(auths), dockerconfig.DOCKER_CFG, ".dockercfg"
    else:
        raw, stype, key = json.dumps({"auths": auths}), dockerconfig.DOCKER_CONFIG_JSON, ".dockerconfigjson"
    return {"type": stype, "data": {key: base64.b64encode(raw.encode()).decode()}}


def auth(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_kubectl_create_secret_docker_registry_shape() -> None:
    # what `kubectl create secret docker-registry --docker-server=S --docker-username=u --docker-password=p` writes
    s = secret({"127.0.0.1:5000": {"username": "u", "password": "p", **auth("u", "p")}})
    assert dockerconfig.credentials_for("127.0.0.1:5000/a/b:1", [s]) == [oci.Credentials("u", "p")]


def test_auth_field_wins_over_username_password() -> None:
    s = secret({"reg.example.com": {"username": "x", "password": "y", **auth("u", "p:with:colons")}})
    assert dockerconfig.credentials_for("reg.example.com/a", [s]) == [oci.Credentials("u", "p:with:colons")]


def test_legacy_dockercfg() -> None:
    s = secret({"https://reg.example.com": {"username": "u", "password": "p"}}, legacy=True)
    assert dockerconfig.credentials_for("reg.example.com/a", [s]) == [oci.Credentials("u", "p")]


@pytest.mark.parametrize(("key", "image", "match"), [
    ("127.0.0.1:5000", "127.0.0.1:5000/a:1", True),
    ("http://127.0.0.1:5000/", "127.0.0.1:5000/a:1", True),
    ("127.0.0.1:5001", "127.0.0.1:5000/a:1", False),  # ports must be equal
    ("127.0.0.1", "127.0.0.1:5000/a:1", False),
    ("*.example.com", "reg.example.com/a", True),
    ("*.example.com", "a.reg.example.com/a", False),  # one glob per label
    ("reg.example.com/team", "reg.example.com/team/app", True),
    ("reg.example.com/team", "reg.example.com/other/app", False),
    ("https://index.docker.io/v1/", "busybox", True),
    ("https://index.docker.io/v1/", "docker.io/library/busybox:1", True),
    ("https://index.docker.io/v1/", "quay.io/a/b", False),
    ("quay.io", "busybox", False),
])  # fmt: skip
def test_matching(key: str, image: str, match: bool) -> None:
    got = dockerconfig.credentials_for(image, [secret({key: auth("u", "p")})])
    assert got == ([oci.Credentials("u", "p")] if match else [])


def test_most_specific_key_first_and_other_types_ignored() -> None:
    s = secret({"reg.example.com": auth("general", "1"), "reg.example.com/team": auth("team", "2")})
    opaque = {"type": "Opaque", "data": {".dockerconfigjson": "e30="}}
    got = dockerconfig.credentials_for("reg.example.com/team/app", [opaque, s])
    assert got == [oci.Credentials("team", "2"), oci.Credentials("general", "1")]


def test_unreadable_config() -> None:
    bad = {"type": dockerconfig.DOCKER_CONFIG_JSON, "data": {".dockerconfigjson": base64.b64encode(b"{").decode()}}
    with pytest.raises(dockerconfig.DockerConfigError):
        dockerconfig.credentials_for("reg.example.com/a", [bad])


def test_each_credential_tried_until_one_is_accepted() -> None:
    tried: list[dict[str, oci.Credentials]] = []

    async def attempt(creds: Any) -> str:
        tried.append(dict(creds))
        if creds["r"].username != "good":
            raise oci.OCIError("pulling x: refused") from oci.AuthError("HTTP 401")
        return "ok"

    cands = [oci.Credentials("bad", "1"), oci.Credentials("good", "2")]
    assert asyncio.run(oci.with_each_credential(cands, "r", {}, attempt)) == "ok"
    assert [c["r"].username for c in tried] == ["bad", "good"]
    with pytest.raises(oci.AuthError, match="refused"):
        asyncio.run(oci.with_each_credential(cands[:1], "r", {}, attempt))


def test_secret_validation_of_docker_config() -> None:
    causes = admission._validate_secret(admission.Request(None, {"type": dockerconfig.DOCKER_CONFIG_JSON,  # type: ignore[arg-type]
                                                                 "data": {}}, None, "CREATE"))  # fmt: skip
    assert [(c.field, c.message) for c in causes] == [("data[.dockerconfigjson]", "Required value")]
    ok = secret({"r": auth("u", "p")})
    assert admission._validate_secret(admission.Request(None, ok, None, "CREATE")) == []  # type: ignore[arg-type]
    bad = {"type": dockerconfig.DOCKER_CONFIG_JSON, "data": {".dockerconfigjson": base64.b64encode(b"[").decode()}}
    causes = admission._validate_secret(admission.Request(None, bad, None, "CREATE"))  # type: ignore[arg-type]
    assert causes and causes[0].field == "data[.dockerconfigjson]"
