"""Volume resolution against an in-memory API (real qemu-img / xorriso for the files it makes)."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from virtplane.client import rest
from virtplane.node import volumes as vol
from virtplane.storage import oci

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("xorriso") is None,
                                reason="qemu-img and xorriso are needed")  # fmt: skip


class FakeAPI:
    """get/list over a dict keyed by (plural, namespace, name)."""

    def __init__(self, objects: dict[tuple[str, str | None, str], dict[str, Any]]) -> None:
        self.objects = objects

    async def get(self, gvr: rest.GVR, name: str, namespace: str | None = None) -> dict[str, Any]:
        try:
            return self.objects[(gvr.plural, namespace if gvr.namespaced else None, name)]
        except KeyError:
            raise rest.NotFound(404, {"reason": "NotFound"}) from None

    async def list(self, gvr: rest.GVR, namespace: str | None = None, **params: str) -> dict[str, Any]:
        return {"items": [o for (p, ns, _), o in self.objects.items() if p == gvr.plural and ns == namespace]}


class FakeImages:
    def __init__(self, disk: Path) -> None:
        self.disk = disk
        self.pulled: list[str] = []

    async def pull(self, image: str, credentials: Any = ()) -> oci.PulledDisk:
        if "missing" in image:
            raise oci.NotFoundError(f"GET {image}: not found")
        self.pulled.append(image)
        return oci.PulledDisk(image, "sha256:" + "0" * 64, self.disk, "qcow2", "tiny.qcow2")


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def vmi(volumes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"metadata": {"name": "vm", "namespace": "ns", "uid": "u"},
            "spec": {"domain": {"devices": {"disks": [{"name": v["name"]} for v in volumes]}},
                     "volumes": volumes}}  # fmt: skip


def resolver(tmp: Path, objects: dict[tuple[str, str | None, str], dict[str, Any]]) -> vol.VolumeResolver:
    base = tmp / "base.qcow2"
    if not base.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    return vol.VolumeResolver(FakeAPI(objects), FakeImages(base), ca_data=b"CA")  # type: ignore[arg-type]


def iso_label(path: Path) -> str:
    data = path.read_bytes()
    return data[0x8028:0x8048].decode().strip()  # ISO 9660 primary volume descriptor: volume identifier


def iso_listing(path: Path) -> str:
    return subprocess.run(["xorriso", "-indev", str(path), "-ls", "/"], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip


def qemu_info(path: Path) -> str:
    return subprocess.run(["qemu-img", "info", "-U", str(path)], capture_output=True, text=True, check=True).stdout


async def test_container_disk_overlay_cloudinit_secret_emptydisk(tmp_path: Path) -> None:
    objects = {("secrets", "ns", "ud"): {"data": {"userdata": b64("#cloud-config\nhostname: x\n")}}}
    r = resolver(tmp_path, objects)
    spec = vmi([
        {"name": "root", "containerDisk": {"image": "reg.io/tiny:1"}},
        {"name": "ci", "cloudInitNoCloud": {"secretRef": {"name": "ud"}}},
        {"name": "scratch", "emptyDisk": {"capacity": "64Mi"}},
    ])  # fmt: skip
    out = await r.resolve(spec, tmp_path / "disks")
    root = out.volumes["root"]
    assert root.format == "qcow2" and root.path == tmp_path / "disks" / "root.qcow2"
    assert f"backing file: {tmp_path / 'base.qcow2'}" in qemu_info(root.path)  # the cache is only read
    assert "containerDiskVolume" in out.status_extra["root"]
    ci = out.volumes["ci"]
    assert not ci.readonly and iso_label(ci.path) == "cidata"
    scratch = out.volumes["scratch"]
    assert "virtual size: 64 MiB" in qemu_info(scratch.path)
    assert out.status_extra["scratch"]["size"] == 64 << 20


async def test_pvc_missing_unbound_and_bound(tmp_path: Path) -> None:
    spec = vmi([{"name": "data", "persistentVolumeClaim": {"claimName": "c1"}}])
    with pytest.raises(vol.VolumeNotReady) as missing:
        await resolver(tmp_path, {}).resolve(spec, tmp_path / "d")
    assert missing.value.reason == "FailedPvcNotFound"
    pending = {("persistentvolumeclaims", "ns", "c1"): {"spec": {}, "status": {"phase": "Pending"}}}
    with pytest.raises(vol.VolumeNotReady) as unbound:
        await resolver(tmp_path, pending).resolve(spec, tmp_path / "d")
    assert unbound.value.reason == "WaitingForVolumeBinding"
    pv_dir = tmp_path / "pv1"
    pv_dir.mkdir()
    (pv_dir / "disk.img").write_bytes(b"\0" * 4096)
    bound = {
        ("persistentvolumeclaims", "ns", "c1"): {
            "spec": {"volumeName": "pv1", "accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "1Gi"}}},
            "status": {"phase": "Bound", "capacity": {"storage": "1Gi"}}},
        ("persistentvolumes", None, "pv1"): {"spec": {"local": {"path": str(pv_dir)}}},
    }  # fmt: skip
    out = await resolver(tmp_path, bound).resolve(spec, tmp_path / "d")
    data = out.volumes["data"]
    assert data.path == pv_dir / "disk.img" and data.format == "raw" and not data.readonly
    info = out.status_extra["data"]["persistentVolumeClaimInfo"]
    assert info["claimName"] == "c1" and info["volumeMode"] == "Filesystem" and info["capacity"] == {"storage": "1Gi"}
    # dataVolume → the PVC of the same name; ephemeral → an overlay, the claim itself only read
    dv = vmi([{"name": "data", "dataVolume": {"name": "c1"}}])
    assert (await resolver(tmp_path, bound).resolve(dv, tmp_path / "d")).volumes["data"].path == pv_dir / "disk.img"
    eph = vmi([{"name": "data", "ephemeral": {"persistentVolumeClaim": {"claimName": "c1"}}}])
    overlay = (await resolver(tmp_path, bound).resolve(eph, tmp_path / "d")).volumes["data"]
    assert overlay.format == "qcow2" and f"backing file: {pv_dir / 'disk.img'}" in qemu_info(overlay.path)


async def test_host_disk(tmp_path: Path) -> None:
    target = tmp_path / "host" / "disk.img"
    spec = vmi([{"name": "h", "hostDisk": {"path": str(target), "type": "Disk"}}])
    with pytest.raises(vol.VolumeNotReady):
        await resolver(tmp_path, {}).resolve(spec, tmp_path / "d")
    create = vmi([{"name": "h", "hostDisk": {"path": str(target), "type": "DiskOrCreate", "capacity": "8Mi"}}])
    out = await resolver(tmp_path, {}).resolve(create, tmp_path / "d")
    assert out.volumes["h"].path == target and target.stat().st_size == 8 << 20
    assert (await resolver(tmp_path, {}).resolve(spec, tmp_path / "d")).volumes["h"].format == "raw"


async def test_config_isos(tmp_path: Path) -> None:
    objects = {
        ("configmaps", "ns", "cm"): {"data": {"a.txt": "hello"}, "binaryData": {"b.bin": b64("\x00\x01")}},
        ("secrets", "ns", "s"): {"data": {"password": b64("pw")}},
        ("secrets", "ns", "sa-token"): {"type": "kubernetes.io/service-account-token", "data": {"token": b64("tok")},
                                        "metadata": {"annotations": {"kubernetes.io/service-account.name": "default"}}},
    }  # fmt: skip
    spec = vmi([
        {"name": "cfg", "configMap": {"name": "cm", "volumeLabel": "OEMDRV"}},
        {"name": "sec", "secret": {"secretName": "s"}},
        {"name": "sa", "serviceAccount": {"serviceAccountName": "default"}},
        {"name": "down", "downwardAPI": {"fields": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]}},
        {"name": "opt", "configMap": {"name": "absent", "optional": True}},
    ])  # fmt: skip
    out = await resolver(tmp_path, objects).resolve(spec, tmp_path / "d")
    assert iso_label(out.volumes["cfg"].path) == "OEMDRV"
    for name in ("sec", "sa", "down", "opt"):
        assert iso_label(out.volumes[name].path) == "cfgdata" and not out.volumes[name].readonly
    listing = iso_listing(out.volumes["sa"].path)
    assert "'ca.crt'" in listing and "'namespace'" in listing and "'token'" in listing
    with pytest.raises(vol.VolumeNotReady):
        await resolver(tmp_path, {}).resolve(vmi([{"name": "c", "configMap": {"name": "absent"}}]), tmp_path / "d")


async def test_unsupported_and_image_pull_failure(tmp_path: Path) -> None:
    with pytest.raises(vol.VolumeError, match="sysprep"):
        await resolver(tmp_path, {}).resolve(vmi([{"name": "s", "sysprep": {}}]), tmp_path / "d")
    with pytest.raises(vol.VolumeError, match="capacity"):
        await resolver(tmp_path, {}).resolve(vmi([{"name": "e", "emptyDisk": {"capacity": "lots"}}]), tmp_path / "d")
    with pytest.raises(vol.VolumeNotReady) as pull:
        await resolver(tmp_path, {}).resolve(vmi([{"name": "r", "containerDisk": {"image": "reg.io/missing"}}]),
                                             tmp_path / "d")  # fmt: skip
    assert pull.value.reason == "ErrImagePull"
    # volumes without a disk (filesystems) are not QEMU block devices: skipped
    spec = vmi([{"name": "fs", "emptyDisk": {"capacity": "1Mi"}}])
    spec["spec"]["domain"]["devices"]["disks"] = []
    assert (await resolver(tmp_path, {}).resolve(spec, tmp_path / "d")).volumes == {}
