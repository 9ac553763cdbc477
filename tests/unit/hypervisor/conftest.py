"""Fixtures for the hypervisor unit tests: KubeVirt-shaped VMIs and resolved inputs (no QEMU started)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from virtplane.hypervisor.runtime import NetworkAttachment, ResolvedVolume, RuntimeDir

# The VM template spec of KubeVirt's "testvm" example (containerDisk + cloudInitNoCloud), as a VMI.
TESTVM: dict[str, Any] = {
    "apiVersion": "kubevirt.io/v1",
    "kind": "VirtualMachineInstance",
    "metadata": {"name": "testvm", "namespace": "default", "uid": "0f2f7d6e-3b0c-4d6b-9d55-1b2a3c4d5e6f"},
    "spec": {
        "domain": {
            "devices": {
                "disks": [
                    {"name": "containerdisk", "disk": {"bus": "virtio"}},
                    {"name": "cloudinitdisk", "disk": {"bus": "virtio"}},
                ],
                "interfaces": [{"name": "default", "masquerade": {}}],
            },
            "resources": {"requests": {"memory": "64M"}},
        },
        "networks": [{"name": "default", "pod": {}}],
        "volumes": [
            {"name": "containerdisk", "containerDisk": {"image": "quay.io/kubevirt/cirros-container-disk-demo"}},
            {"name": "cloudinitdisk", "cloudInitNoCloud": {"userDataBase64": "SGkuXG4="}},
        ],
    },
}


@pytest.fixture
def vmi() -> dict[str, Any]:
    return copy.deepcopy(TESTVM)


@pytest.fixture
def runtime(tmp_path: Path) -> RuntimeDir:
    return RuntimeDir(tmp_path / "rt")


@pytest.fixture
def volumes(tmp_path: Path) -> dict[str, ResolvedVolume]:
    return {
        "containerdisk": ResolvedVolume(tmp_path / "containerdisk.qcow2", "qcow2"),
        "cloudinitdisk": ResolvedVolume(tmp_path / "cidata.iso", "raw", readonly=True),
    }


@pytest.fixture
def nets() -> dict[str, NetworkAttachment]:
    return {"default": NetworkAttachment.tap("tap0")}
