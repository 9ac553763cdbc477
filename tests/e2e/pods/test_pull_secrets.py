"""imagePullSecrets against a registry that wants a password: Debian's docker-registry with htpasswd auth.

The image is pushed through an open registry process on the same storage (the push helper speaks no auth),
then served only by the authenticating one. Pull policy Always everywhere, so each pod really pulls."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from virtplane.testing import containers, guest

from .conftest import PodEnv, ready

USER, PASSWORD = "puller", "pa55-w0rd"


@pytest.fixture(scope="module")
def private_image(env: PodEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("private-registry")
    storage = work / "storage"
    with guest.start_registry(work / "push", storage=storage) as open_reg:
        containers.push_busybox_image(open_reg.host, work, repository="private/busybox", tag="7")
    htpasswd = containers.write_htpasswd(work / "htpasswd", {USER: PASSWORD})
    with guest.start_registry(work / "auth", storage=storage, htpasswd=htpasswd) as reg:
        yield f"{reg.host}/private/busybox:7"


def pod_manifest(name: str, image: str, *, secret: str = "", sa: str = "") -> str:
    extra = f"  imagePullSecrets: [{{name: {secret}}}]\n" if secret else ""
    extra += f"  serviceAccountName: {sa}\n" if sa else ""
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  terminationGracePeriodSeconds: 1
{extra}  containers:
  - {{name: c, image: "{image}", imagePullPolicy: Always, command: ["sleep", "3600"]}}
"""


def waiting(pod: dict[str, Any]) -> dict[str, Any]:
    cs = ((pod.get("status") or {}).get("containerStatuses") or [{}])[0]
    return (cs.get("state") or {}).get("waiting") or {}


def test_without_secret_the_registry_refuses_then_back_off(env: PodEnv, private_image: str) -> None:
    env.apply(pod_manifest("nosecret", private_image))
    pod = env.wait_pod("nosecret", lambda p: waiting(p).get("reason") in ("ErrImagePull", "ImagePullBackOff"),
                       timeout=60, what="ErrImagePull")  # fmt: skip
    assert "HTTP 401 Unauthorized" in waiting(pod)["message"], waiting(pod)
    assert "authentication required" in waiting(pod)["message"], waiting(pod)  # the registry's own words
    env.wait_pod("nosecret", lambda p: waiting(p).get("reason") == "ImagePullBackOff", timeout=30,
                 what="ImagePullBackOff")  # fmt: skip
    env.kubectl("delete", "pod", "nosecret", "--wait=true")


def test_docker_registry_secret_pulls(env: PodEnv, private_image: str) -> None:
    server = private_image.split("/", 1)[0]
    env.kubectl("create", "secret", "docker-registry", "regcred", f"--docker-server={server}",
                f"--docker-username={USER}", f"--docker-password={PASSWORD}")  # fmt: skip
    env.kubectl("create", "secret", "docker-registry", "wrongcred", f"--docker-server={server}",
                f"--docker-username={USER}", "--docker-password=nope")  # fmt: skip
    secret = json.loads(env.kubectl("get", "secret", "regcred", "-o", "json").stdout)
    assert secret["type"] == "kubernetes.io/dockerconfigjson"

    env.apply(pod_manifest("withsecret", private_image, secret="regcred"))
    env.apply(pod_manifest("wrongsecret", private_image, secret="wrongcred"))
    pod = env.wait_pod("withsecret", ready, timeout=90, what="Ready")
    assert pod["status"]["containerStatuses"][0]["imageID"].startswith(f"{server}/private/busybox@sha256:")
    assert env.kubectl("exec", "withsecret", "--", "echo", "pulled").stdout.strip() == "pulled"
    # wrong credentials: the registry refuses them, whatever the image cache holds (pull policy Always)
    pod = env.wait_pod("wrongsecret", lambda p: waiting(p).get("reason") in ("ErrImagePull", "ImagePullBackOff"),
                       timeout=60, what="ErrImagePull")  # fmt: skip
    assert "HTTP 401" in waiting(pod)["message"], waiting(pod)
    env.kubectl("delete", "pod", "withsecret", "wrongsecret", "--wait=true")


def test_service_account_pull_secrets(env: PodEnv, private_image: str) -> None:
    server = private_image.split("/", 1)[0]
    env.kubectl("create", "secret", "docker-registry", "sacred", f"--docker-server={server}",
                f"--docker-username={USER}", f"--docker-password={PASSWORD}")  # fmt: skip
    env.kubectl("create", "serviceaccount", "builder")
    env.kubectl("patch", "serviceaccount", "builder", "-p", '{"imagePullSecrets": [{"name": "sacred"}]}')
    env.apply(pod_manifest("sapod", private_image, sa="builder"))
    env.wait_pod("sapod", ready, timeout=90, what="Ready (credentials of its ServiceAccount)")
    env.kubectl("delete", "pod", "sapod", "--wait=true")
