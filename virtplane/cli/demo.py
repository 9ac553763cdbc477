"""What `virtplane up` adds for a first-time user: the cluster registry with the tiny guest image in it,
and (with --demo) a VirtualMachine that boots it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from virtplane.client import rest
from virtplane.storage import registry

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
DEFAULT_LAYOUT = REPO / "images" / "out" / "containerdisk-oci"
DEMO_REPOSITORY = "virtplane/tiny"
VMS = rest.GVR("kubevirt.io", "v1", "virtualmachines")


def start_cluster_registry(data: Path, port: int) -> registry.LocalRegistry | None:
    """The cluster's registry on 127.0.0.1:PORT (None when Debian's docker-registry is not installed)."""
    if shutil.which(registry.REGISTRY_BINARY) is None:
        log.warning("no %s: the cluster registry is off", registry.REGISTRY_BINARY)
        return None
    reg = registry.start_registry(data / "registry", port)
    log.info("cluster registry listening", extra={"registry": reg.host})
    return reg


async def publish_guest_image(reg: registry.LocalRegistry, layout: Path = DEFAULT_LAYOUT) -> str | None:
    """Push the tiny guest containerDisk (built by `make setup`) as REGISTRY/virtplane/tiny:latest."""
    if not (layout / "index.json").exists():
        log.warning("no guest image at %s (run `make setup`): nothing published", layout)
        return None
    await registry.push_oci_layout(reg.host, layout, DEMO_REPOSITORY)
    ref = f"{reg.host}/{DEMO_REPOSITORY}:latest"
    log.info("published the guest image", extra={"image": ref})
    return ref


def demo_vm(image: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": "demo", "namespace": "default", "labels": {"app": "demo"}},
        "spec": {"runStrategy": "Always", "template": {
            "metadata": {"labels": {"kubevirt.io/vm": "demo"}},
            "spec": {
                "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}},
                                                 {"name": "cloudinit", "disk": {"bus": "virtio"}}]},
                           "resources": {"requests": {"memory": "128Mi"}}},
                "volumes": [
                    {"name": "root", "containerDisk": {"image": image}},
                    {"name": "cloudinit", "cloudInitNoCloud": {"userData": "#cloud-config\npassword: virtplane\n"}},
                ],
            }}},
    }


async def create_demo_vm(client: rest.Client, image: str) -> None:
    try:
        await client.create(VMS, demo_vm(image), "default")
        log.info("created VirtualMachine default/demo")
    except rest.APIError as exc:
        if exc.code != 409:  # already there from an earlier run: keep the user's copy
            raise
