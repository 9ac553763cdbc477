"""VirtualMachineClone end to end: a stopped VM with a containerDisk root and a DataVolume is cloned; the clone
has its own copy of the data volume, filtered labels/annotations, a new MAC, and boots.

A real registry serves the containerDisk; the data volume's first bytes are written on the host before the
clone and read back from the clone's volume with qemu-img (a copy-on-write clone is a qcow2 overlay).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from virtplane.testing import guest
from virtplane.testing.cluster import Cluster

from .test_hotplug import STEP, blank_dv, boot, console, get, medium_path, virtctl, wait_for

pytestmark = pytest.mark.e2e
MARK = b"SRCDATA1"
SOURCE_MAC = "02:00:00:00:00:0a"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    d = Path(tempfile.mkdtemp(prefix="vpc-"))  # short: QEMU's unix sockets live under it
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


def clone(name: str, source: str, target: str, **spec: Any) -> str:
    return json.dumps({"apiVersion": "clone.kubevirt.io/v1beta1", "kind": "VirtualMachineClone",
                       "metadata": {"name": name},
                       "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": source},
                                "target": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": target},
                                **spec}})


def first_bytes(c: Cluster, claim: str, tmp: Path) -> bytes:
    pvc = get(c, "pvc", claim) or {}
    pv = get(c, "pv", pvc["spec"]["volumeName"]) or {}
    d = Path(pv["metadata"]["annotations"]["storage.virtplane.io/directory"])
    src, fmt = (d / "disk.qcow2", "qcow2") if (d / "disk.qcow2").exists() else (d / "disk.img", "raw")
    out = tmp / f"{claim}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(src), str(out)], check=True)
    return out.read_bytes()[:len(MARK)]


def test_clone_stopped_vm(cluster: Cluster, image: str, tmp_path: Path) -> None:
    blank_dv(cluster, "data-src")
    wait_for(lambda: ((get(cluster, "dv", "data-src") or {}).get("status") or {}).get("phase") == "Succeeded", STEP,
             what="DataVolume data-src")
    with open(medium_path(cluster, "data-src"), "r+b") as f:
        f.write(MARK)
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": "src", "labels": {"app": "db", "team": "blue"},
                     "annotations": {"keep/me": "1", "drop/me": "1"}},
        "spec": {"runStrategy": "Halted", "template": {
            "metadata": {"labels": {"kubevirt.io/vm": "src", "tier": "gold"}},
            "spec": {"terminationGracePeriodSeconds": 0,
                     "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}},
                                                      {"name": "data", "disk": {"bus": "virtio"}}],
                                            "interfaces": [{"name": "default", "masquerade": {},
                                                            "macAddress": SOURCE_MAC}]},
                                "firmware": {"serial": "SRC-SERIAL"},
                                "resources": {"requests": {"memory": "128Mi"}}},
                     "networks": [{"name": "default", "pod": {}}],
                     "volumes": [{"name": "root", "containerDisk": {"image": image}},
                                 {"name": "data", "dataVolume": {"name": "data-src"}}]}}}}))
    phases: set[str] = set()

    def phase(name: str) -> str:
        p = ((get(cluster, "vmclone", name) or {}).get("status") or {}).get("phase") or ""
        phases.add(p)
        return p

    try:
        cluster.kubectl("apply", "-f", "-", input=clone("c1", "src", "dst", labelFilters=["*", "!team"],
                                                        annotationFilters=["keep/*"],
                                                        template={"labelFilters": ["kubevirt.io/*"]},
                                                        newSMBiosSerial="DST-SERIAL",
                                                        patches=['{"op": "add", "path": "/metadata/labels/cloned", '
                                                                 '"value": "yes"}',
                                                                 '{"op": "replace", "path": "/spec/template/spec/'
                                                                 'domain/resources/requests/memory", '
                                                                 '"value": "160Mi"}']))
        wait_for(lambda: phase("c1") in ("Succeeded", "Failed"), STEP, interval=0.1, what="clone c1 done")
        status = (get(cluster, "vmclone", "c1") or {})["status"]
        assert status["phase"] == "Succeeded", status
        assert status["targetName"] == "dst"
        assert any(c["type"] == "Ready" and c["status"] == "True" for c in status["conditions"]), status

        dst = get(cluster, "vm", "dst") or {}
        assert dst["metadata"]["labels"] == {"app": "db", "cloned": "yes"}  # filters, then the patches
        assert dst["metadata"]["annotations"].get("keep/me") == "1" and "drop/me" not in dst["metadata"]["annotations"]
        tmpl = dst["spec"]["template"]
        assert tmpl["metadata"]["labels"] == {"kubevirt.io/vm": "dst"}
        assert "macAddress" not in tmpl["spec"]["domain"]["devices"]["interfaces"][0]
        assert tmpl["spec"]["domain"]["firmware"]["serial"] == "DST-SERIAL"
        assert tmpl["spec"]["domain"]["resources"]["requests"]["memory"] == "160Mi"
        data = next(v for v in tmpl["spec"]["volumes"] if v["name"] == "data")
        claim = data["dataVolume"]["name"]
        assert claim.startswith("restore-") and claim != "data-src"
        dv = get(cluster, "dv", claim) or {}
        assert dv["metadata"]["ownerReferences"][0]["name"] == "dst"
        assert first_bytes(cluster, claim, tmp_path) == MARK  # the clone has the source's data

        # a second clone into the same target fails, as in KubeVirt
        cluster.kubectl("apply", "-f", "-", input=clone("c2", "src", "dst"))
        wait_for(lambda: phase("c2") == "Failed", STEP, what="clone c2 Failed")
        ready = next(c for c in (get(cluster, "vmclone", "c2") or {})["status"]["conditions"] if c["type"] == "Ready")
        assert ready["reason"] == "TargetExists", ready

        # a patch that does not apply fails the clone, naming it, and makes nothing
        cluster.kubectl("apply", "-f", "-", input=clone("c4", "src", "dst4",
                                                        patches=['{"op": "remove", "path": "/spec/nothing"}']))
        wait_for(lambda: phase("c4") == "Failed", STEP, what="clone c4 Failed")
        ready = next(c for c in (get(cluster, "vmclone", "c4") or {})["status"]["conditions"] if c["type"] == "Ready")
        assert ready["reason"] == "InvalidPatches" and "/spec/nothing" in ready["message"], ready
        assert get(cluster, "vm", "dst4") is None

        # volumeNamePolicy PrefixTargetName names the copies <target>-<volume>; a name already taken fails
        # the clone before anything is made
        cluster.kubectl("apply", "-f", "-", input=clone("c5", "src", "dst5", volumeNamePolicy="PrefixTargetName"))
        wait_for(lambda: phase("c5") in ("Succeeded", "Failed"), STEP, what="clone c5 done")
        assert phase("c5") == "Succeeded", get(cluster, "vmclone", "c5")
        volumes = (get(cluster, "vm", "dst5") or {})["spec"]["template"]["spec"]["volumes"]
        assert next(v for v in volumes if v["name"] == "data")["dataVolume"]["name"] == "dst5-data"
        assert first_bytes(cluster, "dst5-data", tmp_path) == MARK
        cluster.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "dst6-data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}}}))
        cluster.kubectl("apply", "-f", "-", input=clone("c6", "src", "dst6", volumeNamePolicy="PrefixTargetName"))
        wait_for(lambda: phase("c6") == "Failed", STEP, what="clone c6 Failed")
        ready = next(c for c in (get(cluster, "vmclone", "c6") or {})["status"]["conditions"] if c["type"] == "Ready")
        assert ready["reason"] == "TargetVolumeExists" and "dst6-data" in ready["message"], ready
        assert get(cluster, "vm", "dst6") is None
        cluster.kubectl("delete", "pvc", "dst6-data", "--wait=false")

        # the clone boots, with a MAC of its own
        virtctl(cluster, "start", "dst")
        boot(cluster, "dst")
        vmi = get(cluster, "vmi", "dst") or {}
        mac = vmi["status"]["interfaces"][0]["mac"]
        assert mac and mac.lower() != SOURCE_MAC, vmi["status"]["interfaces"]

    finally:
        for vm in ("dst", "dst5", "src"):
            cluster.kubectl("delete", "vm", vm, "--wait=false", check=False)
        wait_for(lambda: get(cluster, "vmi", "dst") is None, STEP, what="VMI dst gone")


# The guest writes a marker of its own making to the raw disk with serial "online" (fsync'd), or, when the disk
# has one already (the clone), says which.
ONLINE_SCRIPT = """#!/bin/sh
for d in /sys/block/vd*; do [ "$(cat $d/serial 2>/dev/null)" = online ] && dev=/dev/${d##*/}; done
old=$(dd if=$dev bs=44 count=1 2>/dev/null | tr -d '\\000')
case "$old" in
ONLINE-*) echo "virtplane-test: found $old" > /dev/console ;;
*) m="ONLINE-$(cat /proc/sys/kernel/random/uuid)"
   printf %s "$m" | dd of=$dev bs=44 count=1 conv=notrunc,fsync 2>/dev/null && sync
   echo "virtplane-test: wrote $m" > /dev/console ;;
esac
"""


def test_clone_running_vm(cluster: Cluster, image: str) -> None:
    """An online clone: the running source's disk is copied at one point in time by its node agent (QMP
    blockdev-backup) while it keeps running; the clone boots and finds what the source's guest wrote."""
    blank_dv(cluster, "online-data")
    wait_for(lambda: ((get(cluster, "dv", "online-data") or {}).get("status") or {}).get("phase") == "Succeeded",
             STEP, what="DataVolume online-data")
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "live"},
        "spec": {"runStrategy": "Always", "template": {
            "metadata": {"labels": {"kubevirt.io/vm": "live"}},
            "spec": {"terminationGracePeriodSeconds": 0,
                     "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}},
                                                      {"name": "data", "disk": {"bus": "virtio"}, "serial": "online"},
                                                      {"name": "cloudinit", "disk": {"bus": "virtio"}}]},
                                "resources": {"requests": {"memory": "128Mi"}}},
                     "volumes": [{"name": "root", "containerDisk": {"image": image}},
                                 {"name": "data", "dataVolume": {"name": "online-data"}},
                                 {"name": "cloudinit", "cloudInitNoCloud": {"userData": ONLINE_SCRIPT}}]}}}}))
    try:
        boot(cluster, "live")
        pattern = re.compile(r"virtplane-test: wrote (ONLINE-[0-9a-f-]+)")
        mark = wait_for(lambda: pattern.search(console(cluster, "live")), STEP, what="the source's marker").group(1)
        uid = (get(cluster, "vmi", "live") or {})["metadata"]["uid"]

        cluster.kubectl("apply", "-f", "-", input=clone("c-live", "live", "live-copy"))
        wait_for(lambda: ((get(cluster, "vmclone", "c-live") or {}).get("status") or {}).get("phase")
                 in ("Succeeded", "Failed"), STEP, what="clone c-live done")
        status = (get(cluster, "vmclone", "c-live") or {})["status"]
        assert status["phase"] == "Succeeded", status
        assert status["snapshotName"].startswith("clone-")
        backup = (get(cluster, "vmi", "live") or {})["status"]["changedBlockTracking"]["backupStatus"]
        assert backup["backupName"] == status["snapshotName"] and backup["completed"], backup
        # the source kept running: same VMI, not rebooted
        vmi = get(cluster, "vmi", "live") or {}
        assert vmi["metadata"]["uid"] == uid and vmi["status"]["phase"] == "Running"
        assert console(cluster, "live").count("virtplane-guest: ready") == 1

        claim = next(v for v in (get(cluster, "vm", "live-copy") or {})["spec"]["template"]["spec"]["volumes"]
                     if v["name"] == "data")["dataVolume"]["name"]
        dv = get(cluster, "dv", claim) or {}
        assert dv["metadata"]["annotations"].get("cdi.kubevirt.io/cloneType") == "snapshot", dv["metadata"]
        boot(cluster, "live-copy")  # the source's runStrategy (Always) came along: the clone starts by itself
        wait_for(lambda: f"virtplane-test: found {mark}" in console(cluster, "live-copy"), STEP,
                 what="the clone to find the source's marker")
    finally:
        for vm in ("live-copy", "live"):
            cluster.kubectl("delete", "vm", vm, "--wait=false", check=False)
        wait_for(lambda: get(cluster, "vmi", "live") is None and get(cluster, "vmi", "live-copy") is None, STEP,
                 what="VMIs gone")


def test_cross_namespace_clone(cluster: Cluster) -> None:
    """Cloning from another namespace goes through the API server's clone authorization (the user may create
    datavolumes/source there: today's Authorizer allows every authenticated user) and then works."""
    cluster.kubectl("create", "namespace", "golden")
    cluster.kubectl("apply", "-n", "golden", "-f", "-", input=json.dumps({
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": {"name": "base"},
        "spec": {"source": {"blank": {}},
                 "storage": {"resources": {"requests": {"storage": "64Mi"}}, "storageClassName": "shared"}}}))
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": {"name": "from-golden"},
        "spec": {"source": {"pvc": {"namespace": "golden", "name": "base"}},
                 "storage": {"resources": {"requests": {"storage": "64Mi"}}, "storageClassName": "shared"}}}))
    wait_for(lambda: ((get(cluster, "dv", "from-golden") or {}).get("status") or {}).get("phase") == "Succeeded",
             STEP, what="the cross-namespace clone")
