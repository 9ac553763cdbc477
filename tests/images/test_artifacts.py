"""The build's outputs: manifest, formats, sizes, the containerDisk and its registry push."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest

from virtplane.testing import guest

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def test_manifest_lists_every_artifact_with_its_digest(images: guest.ImagePaths) -> None:
    m = images.manifest
    assert len(m["recipe_hash"]) == 64
    expected = {"tiny.qcow2", "tiny.raw.xz", "tiny.vmdk", "tiny.vhdx", "tiny.iso", "vmlinuz", "initrd.img",
                "containerdisk-oci"}
    assert expected <= set(m["artifacts"])
    for name, art in m["artifacts"].items():
        if "sha256" in art:
            assert sha256(images.out / name) == art["sha256"], name


def test_qcow2_fits_the_size_budget(images: guest.ImagePaths) -> None:
    assert images.qcow2.stat().st_size <= 48 * MiB


def test_rebuild_with_nothing_changed_is_a_hash_check(images: guest.ImagePaths) -> None:
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, str(guest.BUILD_SCRIPT)], capture_output=True, text=True, check=True)
    assert time.monotonic() - t0 < 2.0
    assert "up to date" in res.stderr


@pytest.mark.parametrize(("name", "fmt"), [("tiny.qcow2", "qcow2"), ("tiny.vmdk", "vmdk"), ("tiny.vhdx", "vhdx")])
def test_disk_formats_carry_the_same_disk(images: guest.ImagePaths, name: str, fmt: str) -> None:
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(images.out / name)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == fmt
    assert info["virtual-size"] == images.manifest["disk_virtual_size"]


def test_raw_xz_is_the_raw_disk(images: guest.ImagePaths, tmp_path: Path) -> None:
    raw = tmp_path / "tiny.raw"
    with raw.open("wb") as f:
        subprocess.run(["xz", "-dc", str(images.raw_xz)], stdout=f, check=True)
    assert raw.stat().st_size == images.manifest["disk_virtual_size"]
    # Same guest-visible bytes as the qcow2.
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(images.qcow2)], check=True,
                   capture_output=True)


def test_iso_has_bios_and_uefi_el_torito_entries(images: guest.ImagePaths) -> None:
    res = subprocess.run(["xorriso", "-indev", str(images.iso), "-report_el_torito", "plain"],
                         capture_output=True, text=True, check=True)
    platforms = [line.split()[6] for line in res.stdout.splitlines() if line.startswith("El Torito boot img :")]
    assert platforms == ["BIOS", "UEFI"], res.stdout


def test_containerdisk_layout_has_the_disk_owned_by_qemu(images: guest.ImagePaths) -> None:
    layout = images.containerdisk_oci
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_bytes())
    [layer] = manifest["layers"]
    blob = (layout / "blobs/sha256" / layer["digest"][7:]).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == layer["digest"][7:]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        member = tar.getmember("disk/tiny.qcow2")
        assert (member.uid, member.gid, member.mode) == (107, 107, 0o440)
        data = tar.extractfile(member)
        assert data is not None
        assert hashlib.sha256(data.read()).hexdigest() == images.manifest["artifacts"]["tiny.qcow2"]["sha256"]


def test_containerdisk_pushes_to_a_real_registry(images: guest.ImagePaths, tmp_path: Path) -> None:
    with guest.start_registry(tmp_path / "registry") as reg:
        digest = guest.push_oci_layout(reg.host, images.containerdisk_oci, "virtplane/tiny", "v1")
        index = json.loads((images.containerdisk_oci / "index.json").read_text())
        assert digest == index["manifests"][0]["digest"]
        req = urllib.request.Request(f"{reg.url}/v2/virtplane/tiny/manifests/v1",
                                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.headers["Docker-Content-Digest"] == digest
            manifest = json.loads(r.read())
        layer = manifest["layers"][0]["digest"]
        with urllib.request.urlopen(f"{reg.url}/v2/virtplane/tiny/blobs/{layer}", timeout=30) as r:
            assert "sha256:" + hashlib.sha256(r.read()).hexdigest() == layer
        with urllib.request.urlopen(f"{reg.url}/v2/virtplane/tiny/tags/list", timeout=10) as r:
            assert json.loads(r.read())["tags"] == ["v1"]
