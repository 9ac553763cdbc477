"""`virtctl import-vm`: an OVA built like a VMware export (OVF + manifest + streamOptimized VMDK of the tiny
guest) is imported from a real HTTP server on 127.0.0.1 and from a local file, and the VM boots.

A guest has booted when its serial console shows `virtplane-guest: booted` (tests/e2e/storage/test_vm_disks.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.storage.test_vm_disks import _reachable, boots, cluster, delete_vm, get, virtctl  # noqa: F401
from tests.unit.storage.ovas import make_ova, vmware_ovf
from virtplane.testing import guest
from virtplane.testing.cluster import Cluster, free_port
from virtplane.testing.waiting import wait_for

pytestmark = pytest.mark.e2e
MAC = "00:50:56:12:34:56"


@pytest.fixture(scope="module")
def ovas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ova")
    disk = d / "tiny-disk1.vmdk"  # what VMware exports: a streamOptimized (compressed) VMDK
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized",
                    str(guest.image_paths().qcow2), str(disk)], check=True)
    ovf = vmware_ovf("Tiny OVA", cpus=2, cores=2, memory_mib=256, controller="sata",
                     disks=[(disk.name, 128 << 20, disk.stat().st_size)], nics=[("VM Network", "E1000e", MAC)])
    return {"good": make_ova(d / "tiny.ova", ovf, {disk.name: disk}),
            "corrupt": make_ova(d / "corrupt.ova", ovf, {disk.name: disk}, corrupt_digest=disk.name)}


@pytest.fixture(scope="module")
def http(ovas: dict[str, Path]) -> Iterator[str]:
    port = free_port()
    root = ovas["good"].parent
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(root),
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for(lambda: _reachable(f"http://127.0.0.1:{port}/tiny.ova"), 20, what="the HTTP server")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_import_ova_from_http_then_boot(cluster: Cluster, http: str) -> None:  # noqa: F811
    out = virtctl(cluster, "import-vm", "--ova", f"{http}/tiny.ova", "--storage-class", "shared", "--start")
    assert "VirtualMachine default/tiny-ova created: 2 vCPU(s), 256.0 MiB memory" in out.stderr, out.stderr
    assert "Uploading tiny-disk1.vmdk to DataVolume default/tiny-ova-vmdisk1" in out.stderr
    assert "100.0%" in out.stderr
    assert "VirtualMachine default/tiny-ova imported" in out.stdout
    try:
        vm = get(cluster, "vm", "tiny-ova")
        assert vm is not None
        spec = vm["spec"]["template"]["spec"]
        assert spec["domain"]["cpu"] == {"sockets": 1, "cores": 2, "threads": 1}
        assert spec["domain"]["memory"] == {"guest": "256Mi"}
        assert spec["domain"]["devices"]["disks"] == [{"name": "disk0", "disk": {"bus": "sata"}, "bootOrder": 1}]
        assert spec["domain"]["devices"]["interfaces"] == [
            {"name": "nic0", "model": "e1000e", "macAddress": MAC, "masquerade": {}}]
        dv = get(cluster, "dv", "tiny-ova-vmdisk1")
        assert dv is not None and dv["status"]["phase"] == "Succeeded"
        assert dv["metadata"]["ownerReferences"][0]["name"] == "tiny-ova"
        boots(cluster, "tiny-ova")
        vmi = get(cluster, "vmi", "tiny-ova")
        assert vmi is not None
        macs = [i.get("mac") for i in (vmi.get("status") or {}).get("interfaces") or []]
        assert MAC in macs or not macs, macs
    finally:
        delete_vm(cluster, "tiny-ova")
        cluster.kubectl("delete", "vm", "tiny-ova", "--ignore-not-found", check=False)


def test_import_local_ova_with_a_corrupt_disk(cluster: Cluster, ovas: dict[str, Path]) -> None:  # noqa: F811
    bad = virtctl(cluster, "import-vm", "broken", "--ova", str(ovas["corrupt"]), "--storage-class", "shared",
                  check=False)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert "SHA256 digest mismatch with the OVA's manifest" in last, bad.stderr
    assert "the partially imported VirtualMachine default/broken and its DataVolumes were deleted" in last
    assert "Traceback" not in bad.stderr
    wait_for(lambda: get(cluster, "vm", "broken") is None and get(cluster, "dv", "broken-vmdisk1") is None, 60,
             what="the failed import cleaned up")
    # the same command with a good OVA then works (nothing is left in the way)
    ok = virtctl(cluster, "import-vm", "broken", "--ova", str(ovas["good"]), "--storage-class", "shared")
    assert "VirtualMachine default/broken imported" in ok.stdout
    assert "start it with: virtctl start broken" in ok.stdout
    vm = get(cluster, "vm", "broken")
    assert vm is not None and vm["spec"]["runStrategy"] == "Halted"
    assert json.dumps(vm["metadata"]["annotations"]).count(str(ovas["good"])) == 1
    cluster.kubectl("delete", "vm", "broken", check=False)
