"""A containerDisk's imagePullSecret against Debian's docker-registry with htpasswd auth (the same puller
and keyring as pods' imagePullSecrets)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from virtplane.node import volumes as vol
from virtplane.storage import oci
from virtplane.testing import containers, guest

from .test_node_volumes import FakeAPI, vmi

pytestmark = pytest.mark.skipif(not Path("/usr/bin/docker-registry").exists() or shutil.which("qemu-img") is None,
                                reason="docker-registry and qemu-img are needed")  # fmt: skip


def docker_secret(server: str, user: str, password: str) -> dict[str, Any]:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    cfg = json.dumps({"auths": {server: {"username": user, "password": password, "auth": auth}}})
    data = {".dockerconfigjson": base64.b64encode(cfg.encode()).decode()}
    return {"type": "kubernetes.io/dockerconfigjson", "data": data}


async def test_container_disk_image_pull_secret(tmp_path: Path) -> None:
    disk = tmp_path / "tiny.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)  # noqa: ASYNC221
    layout = guest.make_kernelboot_oci_layout(tmp_path / "layout", {"/disk/tiny.qcow2": disk})
    storage = tmp_path / "storage"
    with guest.start_registry(tmp_path / "push", storage=storage) as open_reg:
        await guest.apush_oci_layout(open_reg.host, layout, "private/disk", "1")
    htpasswd = containers.write_htpasswd(tmp_path / "htpasswd", {"u": "right"})
    with guest.start_registry(tmp_path / "auth", storage=storage, htpasswd=htpasswd) as reg:
        image = f"{reg.host}/private/disk:1"
        objects = {("secrets", "ns", "good"): docker_secret(reg.host, "u", "right"),
                   ("secrets", "ns", "bad"): docker_secret(reg.host, "u", "wrong")}  # fmt: skip

        def resolver() -> vol.VolumeResolver:
            return vol.VolumeResolver(FakeAPI(objects), oci.ImageCache(tmp_path / "images"))  # type: ignore[arg-type]

        for secret in (None, "bad"):
            src = {"image": image, **({"imagePullSecret": secret} if secret else {})}
            with pytest.raises(vol.VolumeNotReady, match="HTTP 401") as refused:
                await resolver().resolve(vmi([{"name": "root", "containerDisk": src}]), tmp_path / "d")
            assert refused.value.reason == "ErrImagePull"
        with pytest.raises(vol.VolumeNotReady, match="secret ns/absent not found"):
            await resolver().resolve(vmi([{"name": "root", "containerDisk": {"image": image,
                                                                             "imagePullSecret": "absent"}}]),
                                     tmp_path / "d")  # fmt: skip
        out = await resolver().resolve(vmi([{"name": "root", "containerDisk": {"image": image,
                                                                               "imagePullSecret": "good"}}]),
                                       tmp_path / "d")  # fmt: skip
        assert out.volumes["root"].format == "qcow2"
