"""virtctl image-upload: the DataVolume it creates, flag checks, the progress bar (no cluster)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from virtplane.cli import virtctl


def parse(*argv: str) -> virtctl.argparse.Namespace:
    return virtctl.parse_args(["image-upload", *argv])


def test_datavolume_uses_the_storage_api(tmp_path: Path) -> None:
    args = parse("dv", "img", "--size", "1Gi", "--image-path", "x")
    dv = virtctl.upload_datavolume(args, "ns")
    assert dv["metadata"] == {"name": "img", "namespace": "ns"}
    # nothing but the size: the StorageProfile chooses access and volume mode
    assert dv["spec"] == {"source": {"upload": {}}, "contentType": "kubevirt",
                          "storage": {"resources": {"requests": {"storage": "1Gi"}}}}


def test_datavolume_flags(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"x")
    args = parse("pvc", "img", "--size", "2Gi", "--image-path", str(image), "--storage-class", "local",
                 "--access-mode", "ReadWriteOnce", "--volume-mode", "Block", "--force-bind")
    assert virtctl._check_upload_args(args) == image
    dv = virtctl.upload_datavolume(args, "default")
    assert dv["metadata"]["annotations"] == {"cdi.kubevirt.io/storage.bind.immediate.requested": "true"}
    assert dv["spec"]["storage"] == {"resources": {"requests": {"storage": "2Gi"}}, "storageClassName": "local",
                                     "accessModes": ["ReadWriteOnce"], "volumeMode": "Block"}


@pytest.mark.parametrize(("argv", "message", "code"), [
    (("vm", "x", "--size", "1Gi"), 'must be "dv" or "pvc"', 2),
    (("dv", "x", "--size", "1Gi"), "--image-path is required", 2),
    (("dv", "x", "--size", "1Gi", "--image-path", "/nonexistent"), "no such file", 1),
    (("dv", "x", "--image-path", "IMAGE"), "--size is required", 2),
    (("dv", "x", "--size", "1Gi", "--image-path", "IMAGE", "--access-mode", "RWX"), "--access-mode", 2),
    (("dv", "x", "--size", "1Gi", "--image-path", "IMAGE", "--volume-mode", "raw"), "--volume-mode", 2),
])
def test_bad_flags(tmp_path: Path, argv: tuple[str, ...], message: str, code: int) -> None:
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"x")
    args = parse(*[str(image) if a == "IMAGE" else a for a in argv])
    with pytest.raises(virtctl.CLIError) as err:
        virtctl._check_upload_args(args)
    assert message in err.value.message and err.value.code == code


def test_no_create_needs_no_size(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"x")
    assert virtctl._check_upload_args(parse("dv", "x", "--no-create", "--image-path", str(image))) == image


def test_progress_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    bar = virtctl.Progress(10 * 1024 * 1024, out)
    for _ in range(10):
        bar.add(1024 * 1024)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # one per 10 %, never a redraw in a log file
    assert lines[-1].startswith("10.0 MiB / 10.0 MiB [") and lines[-1].endswith("100.0%")
