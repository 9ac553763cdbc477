"""Boot sources other than a BIOS containerDisk, through `virtplane up` as a user sees them.

- kernelBoot: the kernel and initrd come from a container image in a real registry (the tiny initrd is the
  whole system, so no disk is needed); an image without the kernel path fails the VMI with a clear message;
- EFI (OVMF, secureBoot false) from the containerDisk;
- a VM whose root disk is a DataVolume imported over HTTP from 127.0.0.1: state written by the guest on its
  `vpstate` partition survives stop/start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from virtplane.testing import guest
from virtplane.testing.cluster import Cluster, free_port

from .test_lifecycle import console, get, virtctl, vmi_phase, wait_for, wait_running_and_booted

pytestmark = pytest.mark.e2e

BOOTED = "virtplane-guest: booted"
KERNEL_ARGS = guest.image_paths().kernel_cmdline


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One registry with the containerDisk and a kernelBoot image (/boot/vmlinuz, /boot/initrd.img)."""
    work = tmp_path_factory.mktemp("boot-registry")
    with guest.start_registry(work) as reg:
        guest.push_oci_layout(reg.host, guest.image_paths().containerdisk_oci, "virtplane/tiny", "latest")
        kernel = guest.push_kernelboot_image(reg.host, work)
        yield {"disk": f"{reg.host}/virtplane/tiny:latest", "kernel": kernel}


@pytest.fixture(scope="module")
def http_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A plain HTTP server on 127.0.0.1 serving tiny.qcow2, as a user's image server would."""
    d = tmp_path_factory.mktemp("http-images")
    src = guest.image_paths().qcow2
    try:
        os.link(src, d / src.name)
    except OSError:
        shutil.copy(src, d / src.name)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(d),
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/{src.name}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=1):
                return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    try:
        wait_for(up, 20, 0.1, what="HTTP server")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module", autouse=True)
def cleanup(cluster: Cluster) -> Iterator[None]:
    """Delete what this module created even when a test failed: stopping the cluster leaves QEMUs running
    (the node agent re-adopts them), so a leftover VM would burn the shared CPUs for everyone."""
    yield
    cluster.kubectl("delete", "vm", "pvm", "--ignore-not-found", "--timeout=90s", check=False)
    cluster.kubectl("delete", "vmi", "kboot", "kboot-bad", "efi", "--ignore-not-found", "--timeout=90s",
                    check=False)


def apply(cluster: Cluster, doc: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))


def vmi(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "metadata": {"name": name},
            "spec": {"terminationGracePeriodSeconds": 5, **spec}}


def kernel_boot(image: str, kernel_path: str = "/boot/vmlinuz") -> dict[str, Any]:
    return {"kernelBoot": {"kernelArgs": KERNEL_ARGS, "container": {
        "image": image, "kernelPath": kernel_path, "initrdPath": "/boot/initrd.img",
        "imagePullPolicy": "IfNotPresent"}}}


def delete(cluster: Cluster, kind: str, name: str) -> None:
    cluster.kubectl("delete", kind, name, "--timeout=90s")
    wait_for(lambda: get(cluster, "vmi", name) is None, 90, what=f"VMI {name} gone")


def test_kernel_boot_from_a_container_image(cluster: Cluster, images: dict[str, str]) -> None:
    apply(cluster, vmi("kboot", {"domain": {"firmware": kernel_boot(images["kernel"]), "devices": {},
                                            "resources": {"requests": {"memory": "128Mi"}}}}))
    wait_running_and_booted(cluster, "kboot", timeout=180)
    # The initrd is the whole system: it goes on to its login prompt with no disk at all.
    wait_for(lambda: "cloud-init no datasource" in console(cluster, "kboot"), 60, what="guest userspace")
    delete(cluster, "vmi", "kboot")


def test_kernel_boot_image_without_the_kernel_fails_clearly(cluster: Cluster, images: dict[str, str]) -> None:
    # The containerDisk is a valid image that has no /boot/vmlinuz: retrying cannot help.
    apply(cluster, vmi("kboot-bad", {"domain": {"firmware": kernel_boot(images["disk"]), "devices": {},
                                                "resources": {"requests": {"memory": "128Mi"}}}}))
    wait_for(lambda: vmi_phase(cluster, "kboot-bad") == "Failed", 60, what="kboot-bad Failed")
    got = get(cluster, "vmi", "kboot-bad")
    assert got is not None
    messages = " ".join(c.get("message", "") for c in got["status"].get("conditions", []))
    events = cluster.kubectl("get", "events", "--field-selector", "involvedObject.name=kboot-bad",
                             "-o", "json").stdout
    for text in (messages, events):
        assert "kernelBoot" in text and "/boot/vmlinuz" in text, text
    delete(cluster, "vmi", "kboot-bad")


def test_efi_boots_with_ovmf(cluster: Cluster, images: dict[str, str]) -> None:
    apply(cluster, vmi("efi", {
        "domain": {"firmware": {"bootloader": {"efi": {"secureBoot": False}}},
                   "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
                   # OVMF page-faults loading systemd-boot with 128Mi under TCG; 256Mi is enough.
                   "resources": {"requests": {"memory": "256Mi"}}},
        "volumes": [{"name": "root", "containerDisk": {"image": images["disk"]}}]}))
    # OVMF takes ~8-10 s under TCG on an idle host, and several times that when the 2 cores are shared.
    wait_running_and_booted(cluster, "efi", timeout=180)
    text = console(cluster, "efi")
    assert "SeaBIOS" not in text  # booted through UEFI, not the default BIOS
    delete(cluster, "vmi", "efi")


# Every boot (bootcmd), before the network: count boots on the guest's persistent state partition.
BOOT_COUNTER = """#cloud-config
bootcmd:
  - 'echo $(( $(cat /var/lib/virtplane/boots 2>/dev/null || echo 0) + 1 )) > /var/lib/virtplane/boots.new'
  - 'mv /var/lib/virtplane/boots.new /var/lib/virtplane/boots; sync'
  - 'echo "user-boots $(cat /var/lib/virtplane/boots)" > /dev/ttyS0'
runcmd:
  - 'echo marker > /var/lib/virtplane/marker; sync'
"""


def boots(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"user-boots (\d+)", text)]


def test_vm_with_a_datavolume_keeps_its_data_across_stop_start(cluster: Cluster, http_url: str) -> None:
    vm = {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "pvm"},
        "spec": {
            "runStrategy": "Always",
            "dataVolumeTemplates": [{"metadata": {"name": "pvm-root"}, "spec": {
                "source": {"http": {"url": http_url}},
                "storage": {"storageClassName": "shared", "resources": {"requests": {"storage": "200Mi"}}}}}],
            "template": {"metadata": {"labels": {"kubevirt.io/vm": "pvm"}}, "spec": {
                "terminationGracePeriodSeconds": 30,
                "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}},
                                                 {"name": "cloudinit", "disk": {"bus": "virtio"}}]},
                           "resources": {"requests": {"memory": "128Mi"}}},
                "volumes": [{"name": "root", "dataVolume": {"name": "pvm-root"}},
                            {"name": "cloudinit", "cloudInitNoCloud": {"userData": BOOT_COUNTER}}]}}},
    }
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(vm))
    got = wait_running_and_booted(cluster, "pvm", timeout=120)
    assert "persistentVolumeClaimInfo" in json.dumps(got["status"].get("volumeStatus", []))
    wait_for(lambda: "virtplane-guest: state on vda2" in console(cluster, "pvm"), 60, what="state partition")
    wait_for(lambda: boots(console(cluster, "pvm")) == [1], 60, what="first boot counted")
    wait_for(lambda: "cloud-init runcmd exit 0" in console(cluster, "pvm"), 60, what="runcmd")

    virtctl(cluster, "stop", "pvm")
    wait_for(lambda: get(cluster, "vmi", "pvm") is None, 90, what="VMI gone after stop")
    virtctl(cluster, "start", "pvm")
    wait_running_and_booted(cluster, "pvm", timeout=120)
    # The counter was read back from the PVC: the disk, not a fresh copy, backs the restarted VM.
    wait_for(lambda: boots(console(cluster, "pvm")) == [2], 60, what="second boot counted")
    wait_for(lambda: "per-instance steps already done" in console(cluster, "pvm"), 60, what="instance state kept")
    assert "cloud-init runcmd exit" not in console(cluster, "pvm").split(BOOTED)[-1]

    cluster.kubectl("delete", "vm", "pvm", "--timeout=120s")
    wait_for(lambda: get(cluster, "vmi", "pvm") is None, 90, what="VMI deleted with its VM")
