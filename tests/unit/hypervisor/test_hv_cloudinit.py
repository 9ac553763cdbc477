"""NoCloud and ConfigDrive disks: labels and files as cloud-init expects them (built with xorriso)."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest

from virtplane.hypervisor.cloudinit import (
    CloudInitData,
    build_configdrive,
    build_for_volume,
    build_nocloud,
)
from virtplane.hypervisor.errors import InvalidSpecError


def iso_files(iso: Path, dest: Path) -> dict[str, bytes]:
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/", str(dest)],
                   check=True, capture_output=True)  # fmt: skip
    return {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}


def iso_label(iso: Path) -> str:
    out = subprocess.run(["xorriso", "-indev", str(iso), "-pvd_info"], check=True, capture_output=True, text=True)
    line = next(ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Volume Id"))
    return line.split(":", 1)[1].strip()


async def test_nocloud(tmp_path: Path) -> None:
    data = CloudInitData(user_data=b"#cloud-config\npassword: x\n", network_data=b"version: 2\n")
    vol = await build_nocloud(tmp_path / "cidata.iso", data, instance_id="testvm.default", hostname="testvm",
                              public_keys=["ssh-ed25519 AAAA test"])  # fmt: skip
    assert not vol.readonly and vol.format == "raw"
    assert iso_label(vol.path) == "cidata"
    files = iso_files(vol.path, tmp_path / "x")
    assert files["user-data"] == b"#cloud-config\npassword: x\n"
    assert files["network-config"] == b"version: 2\n"
    meta = json.loads(files["meta-data"])  # JSON is YAML too
    assert meta == {"instance-id": "testvm.default", "local-hostname": "testvm",
                    "public-keys": {"0": "ssh-ed25519 AAAA test"}}  # fmt: skip
    assert vol.path.stat().st_mode & 0o077 == 0  # user data may hold secrets


async def test_nocloud_network_only_still_has_user_data(tmp_path: Path) -> None:
    vol = await build_nocloud(tmp_path / "c.iso", CloudInitData(network_data=b"{}"), instance_id="i")
    assert iso_files(vol.path, tmp_path / "x")["user-data"] == b""


async def test_configdrive(tmp_path: Path) -> None:
    data = CloudInitData(user_data=b"#!/bin/sh\necho hi\n", network_data=b'{"links": []}')
    vol = await build_configdrive(tmp_path / "cd.iso", data, instance_id="uid-1", hostname="vm1")
    assert iso_label(vol.path) == "config-2"
    files = iso_files(vol.path, tmp_path / "x")
    assert files["openstack/latest/user_data"] == b"#!/bin/sh\necho hi\n"
    assert files["openstack/latest/network_data.json"] == b'{"links": []}'
    assert json.loads(files["openstack/latest/meta_data.json"]) == {"uuid": "uid-1", "hostname": "vm1"}


def test_from_source_variants() -> None:
    enc = base64.b64encode(b"#cloud-config\n").decode()
    assert CloudInitData.from_source({"userDataBase64": enc}).user_data == b"#cloud-config\n"
    assert CloudInitData.from_source({"userData": "x", "networkData": "n"}) == CloudInitData(b"x", b"n")
    resolved = CloudInitData.from_source({"secretRef": {"name": "s"}}, user_data_secret="from-secret")
    assert resolved.user_data == b"from-secret"
    with pytest.raises(InvalidSpecError, match="not resolved"):
        CloudInitData.from_source({"secretRef": {"name": "s"}})
    with pytest.raises(InvalidSpecError) as err:
        CloudInitData.from_source({"userData": "a", "userDataBase64": enc}, field="spec.volumes[1].cloudInitNoCloud")
    assert err.value.field_path == "spec.volumes[1].cloudInitNoCloud.userDataBase64"
    with pytest.raises(InvalidSpecError, match="base64"):
        CloudInitData.from_source({"userDataBase64": "!!"})
    with pytest.raises(InvalidSpecError, match="needs user data"):
        CloudInitData.from_source({})


async def test_build_for_volume_uses_kubevirt_identities(vmi, tmp_path: Path) -> None:
    vol = await build_for_volume(vmi, "cloudinitdisk", tmp_path / "ci.iso")
    files = iso_files(vol.path, tmp_path / "x")
    assert files["user-data"] == b"Hi.\\n"
    assert json.loads(files["meta-data"]) == {"instance-id": "testvm.default", "local-hostname": "testvm"}
    vmi["spec"]["volumes"][1] = {"name": "cloudinitdisk", "cloudInitConfigDrive": {"userData": "ud"}}
    vmi["spec"]["hostname"] = "custom"
    vol = await build_for_volume(vmi, "cloudinitdisk", tmp_path / "cd.iso")
    meta = json.loads(iso_files(vol.path, tmp_path / "y")["openstack/latest/meta_data.json"])
    assert meta == {"uuid": vmi["metadata"]["uid"], "hostname": "custom"}
    with pytest.raises(InvalidSpecError):
        await build_for_volume(vmi, "containerdisk", tmp_path / "z.iso")
