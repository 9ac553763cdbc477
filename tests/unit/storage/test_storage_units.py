"""Unit tests: the streaming qcow2 converter against qemu-img, tokens, profiles, sizes."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from virtplane.storage import importer, profiles, provisioner, upload

TINY = Path(__file__).resolve().parents[3] / "images" / "out" / "tiny.qcow2"


def _stream(src: Path, work: Path, limit: int = 1 << 30) -> importer.PipelineResult:
    target = work / "out.raw"
    return importer.run_pipeline(importer.file_chunks(src, threading.Event()), importer.Pipeline(target, work, limit))


@pytest.mark.parametrize("variant", ["plain", "compressed", "v2", "small-clusters", "l1-at-end"])
def test_qcow2_stream_matches_qemu_img(tmp_path: Path, variant: str) -> None:
    if not TINY.exists():
        pytest.skip("images not built")
    src = tmp_path / "src.qcow2"
    opts = {"plain": [], "compressed": ["-c"], "v2": ["-o", "compat=0.10"],
            "small-clusters": ["-o", "cluster_size=4096"], "l1-at-end": []}[variant]
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", *opts, str(TINY), str(src)], check=True)
    if variant == "l1-at-end":
        # growing the image reallocates the L1 table after the data: everything before it is spilled
        subprocess.run(["qemu-img", "resize", str(src), "64G"], check=True, capture_output=True)
    result = _stream(src, tmp_path, limit=64 << 30)
    assert result.kind == "qcow2"
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(tmp_path / "out.raw"), str(src)],
                   check=True)


def test_qcow2_with_backing_file_is_refused(tmp_path: Path) -> None:
    overlay = tmp_path / "o.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", str(overlay), "1M"],
                   check=True, capture_output=True)
    with pytest.raises(importer.TransferError) as err:
        _stream(overlay, tmp_path)
    assert err.value.reason == importer.INVALID_IMAGE and "backing file" in err.value.message


def test_raw_too_large(tmp_path: Path) -> None:
    src = tmp_path / "big.raw"
    src.write_bytes(b"\1" * (3 << 20))
    with pytest.raises(importer.TransferError) as err:
        _stream(src, tmp_path, limit=1 << 20)
    assert err.value.reason == importer.TOO_LARGE


def test_checksum(tmp_path: Path) -> None:
    src = tmp_path / "d.raw"
    src.write_bytes(b"x" * 100_000)
    target = tmp_path / "out.raw"
    p = importer.Pipeline(target, tmp_path, 1 << 20, checksum="sha256:" + "0" * 64)
    with pytest.raises(importer.TransferError) as err:
        importer.run_pipeline(importer.file_chunks(src, threading.Event()), p)
    assert err.value.reason == importer.CHECKSUM_MISMATCH
    with pytest.raises(importer.TransferError):
        importer.parse_checksum("crc32:abc")


def test_tokens() -> None:
    key = b"k" * 32
    tok = upload.issue_token(key, "ns", "disk", now=1000.0)
    assert upload.verify_token(key, tok, now=1100.0) == ("ns", "disk")
    with pytest.raises(upload.TokenError):
        upload.verify_token(key, tok, now=2000.0)
    with pytest.raises(upload.TokenError):
        upload.verify_token(b"x" * 32, tok, now=1100.0)
    with pytest.raises(upload.TokenError):
        upload.verify_token(key, "garbage", now=1100.0)


def test_profiles() -> None:
    sc = {"metadata": {"name": "ceph"}, "provisioner": "rbd.csi.ceph.com"}
    st = profiles.profile_status(sc, None)
    assert st["claimPropertySets"][0] == {"accessModes": ["ReadWriteMany"], "volumeMode": "Block"}
    unknown = profiles.profile_status({"metadata": {"name": "x"}, "provisioner": "example.com/x"}, None)
    assert "claimPropertySets" not in unknown
    override = [{"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem"}]
    assert profiles.profile_status(sc, {"claimPropertySets": override})["claimPropertySets"] == override
    assert profiles.first_usable(st["claimPropertySets"], None, "Filesystem") == (["ReadWriteOnce"], "Filesystem")


def test_sizes() -> None:
    gib = 1 << 30
    cap = provisioner.required_capacity(gib, "Filesystem")
    assert provisioner.usable_size(cap, "Filesystem") >= gib
    assert cap < gib * 1.07
    assert provisioner.required_capacity(gib, "Block") == gib
