"""Disk hotplug end to end: `virtctl addvolume/removevolume` on a running VM, the guest announces the disks.

A VM boots from a containerDisk (a real registry on 127.0.0.1); blank DataVolumes are hot-plugged into it:
one into the VMI only (gone after a restart, as in KubeVirt), one with --persist (written into the VM spec,
still there after a restart). The guest's serial console (the `consolelog` subresource) shows
`virtplane-guest: disk NAME added/removed` from the guest's own hotplug handler (images/README.md).

CD-ROM media: a VM with an empty drive gets a medium inserted and ejected (through the VMI subresources, then
declaratively by editing the VM); a root shell on the serial console (`virtctl console`) reads /dev/sr0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from virtplane.testing import guest
from virtplane.testing.cluster import Cluster
from virtplane.testing.waiting import wait_for

pytestmark = pytest.mark.e2e
SUB = "/apis/subresources.kubevirt.io/v1/namespaces/default"
REPO = Path(__file__).resolve().parents[3]
PROMPT = re.compile(rb"root@[\w.-]+:[^\r\n]*# ")
MARK = b"VPMEDIA1"
ADDED = re.compile(r"virtplane-guest: disk (\w+) added")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    d = Path(tempfile.mkdtemp(prefix="vph-"))  # short: QEMU's unix sockets live under it
    old = os.environ.get("VIRTPLANE_STORAGE_ROOT")
    os.environ["VIRTPLANE_STORAGE_ROOT"] = str(d / "storage")
    c = Cluster(d)
    try:
        c.start()
        wait_for(lambda: ((get(c, "storageprofile", "shared") or {}).get("status") or {}).get("claimPropertySets"),
                 STEP, what="StorageProfile shared")
        yield c
    finally:
        c.stop()
        if old is None:
            os.environ.pop("VIRTPLANE_STORAGE_ROOT", None)
        else:
            os.environ["VIRTPLANE_STORAGE_ROOT"] = old
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with guest.registry_with_containerdisk(tmp_path_factory.mktemp("registry")) as (_, ref):
        yield ref


def get(c: Cluster, kind: str, name: str) -> dict[str, Any] | None:
    proc = c.kubectl("get", kind, name, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def console(c: Cluster, name: str) -> str:
    try:
        return c.get_raw(f"{SUB}/virtualmachineinstances/{name}/consolelog").decode(errors="replace")
    except OSError:
        return ""


def virtctl(c: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(c.kubeconfig)}
    proc = subprocess.run([sys.executable, "-m", "virtplane.cli.virtctl", *args], capture_output=True, text=True,
                          env=env, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"virtctl {' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc


def volume_status(c: Cluster, name: str, volume: str) -> dict[str, Any] | None:
    vmi = get(c, "vmi", name) or {}
    return next((v for v in (vmi.get("status") or {}).get("volumeStatus") or [] if v.get("name") == volume), None)


def template_volumes(c: Cluster, name: str) -> list[str]:
    vm = get(c, "vm", name) or {}
    return [v["name"] for v in vm["spec"]["template"]["spec"].get("volumes") or []]


def blank_dv(c: Cluster, name: str) -> None:
    c.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": {"name": name},
        "spec": {"source": {"blank": {}},
                 "storage": {"resources": {"requests": {"storage": "64Mi"}}, "storageClassName": "shared"}}}))


# TCG guests on a 2-core machine shared by parallel test runs (load averages of 20-30 seen): generous bounds,
# every wait ends as soon as its condition holds.
BOOT = 300.0
STEP = 120.0


def boot(c: Cluster, name: str, since: int = 0, timeout: float = BOOT) -> str:
    """Waits for the VMI to run and the guest to finish booting (its hotplug handler is up then)."""
    try:
        wait_for(lambda: ((get(c, "vmi", name) or {}).get("status") or {}).get("phase") == "Running", timeout,
                 what=f"VMI {name} Running")
        return wait_for(lambda: (t := console(c, name)).count("virtplane-guest: ready") > since and t, timeout,
                        what=f"{name} booted")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nVMI: {(get(c, 'vmi', name) or {}).get('status')}\n{console(c, name)[-2000:]}"
                             f"\n{c.log_tail(4000)}") from None


def announced(c: Cluster, name: str, after: int, what: str = "added") -> str:
    """The guest's name for the next disk it announces as `what` after console offset `after`."""
    pattern = re.compile(rf"virtplane-guest: disk (\w+) {what}")
    match = wait_for(lambda: pattern.search(console(c, name), after), STEP, what=f"the guest to see a disk {what}")
    return match.group(1)


def test_hotplug_unplug_persist(cluster: Cluster, image: str) -> None:
    for dv in ("hot-a", "hot-b"):
        blank_dv(cluster, dv)
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "hot"},
        "spec": {"runStrategy": "Always", "template": {
            "metadata": {"labels": {"kubevirt.io/vm": "hot"}},
            "spec": {"terminationGracePeriodSeconds": 0,
                     "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
                                "resources": {"requests": {"memory": "128Mi"}}},
                     "volumes": [{"name": "root", "containerDisk": {"image": image}}]}}}}))
    try:
        text = boot(cluster, "hot")
        for dv in ("hot-a", "hot-b"):
            wait_for(lambda dv=dv: ((get(cluster, "dv", dv) or {}).get("status") or {}).get("phase") == "Succeeded",
                     STEP, what=f"DataVolume {dv}")

        # VMI only (not persisted): scsi, KubeVirt's default hotplug bus
        mark = len(text)
        out = virtctl(cluster, "addvolume", "hot", "--volume-name", "hot-a", "--serial", "HOTA")
        assert "Successfully submitted add volume request" in out.stdout
        sd = announced(cluster, "hot", mark)
        assert sd.startswith("sd"), sd
        status = wait_for(lambda: (s := volume_status(cluster, "hot", "hot-a")) and s.get("phase") == "Ready" and s,
                          STEP, what="hot-a Ready")
        assert status["hotplugVolume"] == {} and "Successfully attach hotplugged volume" in status["message"]
        assert status["persistentVolumeClaimInfo"]["claimName"] == "hot-a"
        assert "hot-a" not in template_volumes(cluster, "hot")
        vmi = get(cluster, "vmi", "hot") or {}
        vol = next(v for v in vmi["spec"]["volumes"] if v["name"] == "hot-a")
        assert vol["dataVolume"] == {"name": "hot-a", "hotpluggable": True}

        # refusals, as KubeVirt words them
        again = virtctl(cluster, "addvolume", "hot", "--volume-name", "hot-a", check=False)
        assert again.returncode != 0 and "already exists" in again.stderr, again.stderr
        root = virtctl(cluster, "removevolume", "hot", "--volume-name", "root", check=False)
        assert root.returncode != 0 and "not hotpluggable" in root.stderr, root.stderr
        sata = virtctl(cluster, "addvolume", "hot", "--volume-name", "hot-b", "--bus", "sata", check=False)
        assert sata.returncode != 0 and "scsi or virtio" in sata.stderr, sata.stderr
        missing = virtctl(cluster, "removevolume", "hot", "--volume-name", "nope", check=False)
        assert missing.returncode != 0 and "does not exist" in missing.stderr, missing.stderr

        # persisted into the VM (virtio on a spare PCIe root port); the VM controller brings it to the VMI
        mark = len(console(cluster, "hot"))
        virtctl(cluster, "addvolume", "hot", "--volume-name", "hot-b", "--persist", "--bus", "virtio")
        assert "hot-b" in template_volumes(cluster, "hot")
        vd = announced(cluster, "hot", mark)
        assert vd.startswith("vd"), vd
        wait_for(lambda: (volume_status(cluster, "hot", "hot-b") or {}).get("phase") == "Ready", STEP, what="hot-b")
        # a hotplug is not a change that needs a restart
        vm = get(cluster, "vm", "hot") or {}
        assert not any(c["type"] == "RestartRequired" for c in vm["status"].get("conditions") or [])

        # unplug the VMI-only disk: the guest sees it leave, the status entry goes
        mark = len(console(cluster, "hot"))
        virtctl(cluster, "removevolume", "hot", "--volume-name", "hot-a")
        assert announced(cluster, "hot", mark, "removed") == sd
        wait_for(lambda: volume_status(cluster, "hot", "hot-a") is None, STEP, what="hot-a gone from volumeStatus")

        # restart: the persisted volume comes back with the new VMI, the VMI-only one would not
        uid = (get(cluster, "vmi", "hot") or {})["metadata"]["uid"]
        virtctl(cluster, "restart", "hot")
        wait_for(lambda: (v := get(cluster, "vmi", "hot")) and v["metadata"]["uid"] != uid, STEP, what="a new VMI")
        boot(cluster, "hot")
        names = [v["name"] for v in (get(cluster, "vmi", "hot") or {})["spec"]["volumes"]]
        assert names == ["root", "hot-b"], names
        wait_for(lambda: (volume_status(cluster, "hot", "hot-b") or {}).get("phase") == "Ready", STEP, what="hot-b")

        # removing it from the VM unplugs it from the running VMI too (attached at boot this time)
        mark = len(console(cluster, "hot"))
        virtctl(cluster, "removevolume", "hot", "--volume-name", "hot-b", "--persist")
        assert "hot-b" not in template_volumes(cluster, "hot")
        announced(cluster, "hot", mark, "removed")
        wait_for(lambda: volume_status(cluster, "hot", "hot-b") is None, STEP, what="hot-b gone")
        events = cluster.kubectl("get", "events", "--field-selector", "involvedObject.name=hot").stdout
        assert "VolumeAttached" in events and "VolumeDetached" in events, events
    finally:
        cluster.kubectl("delete", "vm", "hot", "--wait=false", check=False)
        wait_for(lambda: get(cluster, "vmi", "hot") is None, STEP, what="VMI hot gone")


def medium_path(c: Cluster, claim: str) -> Path:
    pvc = get(c, "pvc", claim) or {}
    pv = get(c, "pv", pvc["spec"]["volumeName"]) or {}
    return Path(pv["metadata"]["annotations"]["storage.virtplane.io/directory"]) / "disk.img"


class Shell:
    """A root shell on the VM's serial console through `virtctl console`."""

    def __init__(self, c: Cluster, name: str) -> None:
        env = {**os.environ, "KUBECONFIG": str(c.kubeconfig)}
        self.child = pexpect.spawn(sys.executable, ["-m", "virtplane.cli.virtctl", "console", name, "--timeout", "3"],
                                   cwd=str(REPO), env=env, timeout=STEP, dimensions=(40, 200))
        self.child.expect(rb"Successfully connected")
        self.child.send(b"\r")
        self.child.expect(rb"login: ")
        self.child.send(b"root\r")
        self.child.expect(PROMPT)

    def run(self, command: str, timeout: float = 60) -> bytes:
        self.child.send(command.encode() + b"\r")
        self.child.expect(PROMPT, timeout=timeout)
        return bytes(self.child.before)

    def close(self) -> None:
        self.child.close(force=True)


def test_cdrom_inject_and_eject(cluster: Cluster, image: str) -> None:
    blank_dv(cluster, "media")
    wait_for(lambda: ((get(cluster, "dv", "media") or {}).get("status") or {}).get("phase") == "Succeeded", STEP,
             what="DataVolume media")
    with open(medium_path(cluster, "media"), "r+b") as f:  # a recognisable first sector for the guest to read
        f.write(MARK)
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "cd"},
        "spec": {"runStrategy": "Always", "template": {
            "metadata": {"labels": {"kubevirt.io/vm": "cd"}},
            "spec": {"terminationGracePeriodSeconds": 0,
                     "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}},
                                                      {"name": "drive", "cdrom": {"bus": "sata"}}]},
                                "resources": {"requests": {"memory": "128Mi"}}},
                     "volumes": [{"name": "root", "containerDisk": {"image": image}}]}}}}))
    read = "dd if=/dev/sr0 bs=2048 count=1 2>&1 | head -c 64; echo"
    shell: Shell | None = None
    try:
        boot(cluster, "cd")
        shell = Shell(cluster, "cd")
        assert b"No medium found" in shell.run(read)

        # inject declaratively: the VM gets a hotpluggable volume named after the drive, the VM controller
        # carries it to the VMI, the node agent inserts it as the drive's medium
        medium = {"name": "drive", "dataVolume": {"name": "media", "hotpluggable": True}}
        cluster.kubectl("patch", "vm", "cd", "--type=json", "-p", json.dumps(
            [{"op": "add", "path": "/spec/template/spec/volumes/-", "value": medium}]))
        wait_for(lambda: (volume_status(cluster, "cd", "drive") or {}).get("phase") == "Ready", STEP, what="inserted")
        wait_for(lambda: MARK in shell.run(read), 60, interval=1, what="the guest to read the medium")
        vmi = get(cluster, "vmi", "cd") or {}
        assert [d["name"] for d in vmi["spec"]["domain"]["devices"]["disks"]] == ["root", "drive"]  # same drive
        vm = get(cluster, "vm", "cd") or {}
        assert not any(c["type"] == "RestartRequired" for c in vm["status"].get("conditions") or [])

        # eject: the volume leaves the VM, the drive stays, empty
        cluster.kubectl("patch", "vm", "cd", "--type=json", "-p", json.dumps(
            [{"op": "remove", "path": "/spec/template/spec/volumes/1"}]))
        wait_for(lambda: volume_status(cluster, "cd", "drive") is None, STEP, what="ejected")
        wait_for(lambda: b"No medium found" in shell.run(read), 60, interval=1, what="the guest to see no medium")
        events = cluster.kubectl("get", "events", "--field-selector", "involvedObject.name=cd").stdout
        assert "MediaInserted" in events and "MediaEjected" in events, events
    finally:
        if shell is not None:
            shell.close()
        cluster.kubectl("delete", "vm", "cd", "--wait=false", check=False)
        wait_for(lambda: get(cluster, "vmi", "cd") is None, STEP, what="VMI cd gone")
