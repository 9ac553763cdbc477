"""Disk image files the node agent makes for a VM: copy-on-write overlays and blank qcow2 disks (qemu-img).

Overlays are how shared, read-only images (a cached containerDisk, an `ephemeral` PVC) become a writable
VM disk: every write lands in the per-VM qcow2 file, the base is only read, and deleting the overlay
discards the VM's changes — KubeVirt's ephemeral semantics.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any, Literal

QEMU_IMG = "qemu-img"

ImageFormat = Literal["qcow2", "raw"]


class ImageToolError(Exception):
    """qemu-img failed; the message carries its stderr."""


async def _qemu_img(*args: str) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            QEMU_IMG, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    except OSError as err:
        raise ImageToolError(f"cannot run {QEMU_IMG}: {err}") from err
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise ImageToolError(f"{QEMU_IMG} {args[0]} failed (exit {proc.returncode}): "
                             f"{err.decode(errors='replace').strip()}")  # fmt: skip
    return out.decode()


async def image_info(path: Path) -> dict[str, Any]:
    """`qemu-img info` as JSON (format, virtual-size, backing file, ...). `-U`: the image may be in use."""
    return json.loads(await _qemu_img("info", "-U", "--output=json", str(path)))


async def probe_format(path: Path) -> ImageFormat:
    """qcow2 or raw (anything qemu-img does not recognise as qcow2 is used as raw, like ISOs)."""
    fmt = (await image_info(path)).get("format")
    return "qcow2" if fmt == "qcow2" else "raw"


async def create_overlay(base: Path, dest: Path, base_format: ImageFormat) -> Path:
    """A qcow2 overlay at `dest` backed by `base` (absolute path, format pinned so QEMU never probes it)."""
    if not base.is_absolute():
        # qemu-img resolves a relative backing path against the overlay's directory, not ours.
        raise ImageToolError(f"backing file {base} must be an absolute path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    await _qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", base_format, str(tmp))
    os.replace(tmp, dest)
    return dest


async def create_blank(dest: Path, size_bytes: int) -> Path:
    """A sparse qcow2 disk of `size_bytes` (emptyDisk, hostDisk DiskOrCreate)."""
    if size_bytes <= 0:
        raise ImageToolError(f"disk size must be positive, not {size_bytes}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    await _qemu_img("create", "-q", "-f", "qcow2", str(tmp), str(size_bytes))
    os.replace(tmp, dest)
    return dest


async def create_blank_raw(dest: Path, size_bytes: int) -> Path:
    """A sparse raw file (hostDisk DiskOrCreate: KubeVirt creates `disk.img` files as raw)."""
    if size_bytes <= 0:
        raise ImageToolError(f"disk size must be positive, not {size_bytes}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    await _qemu_img("create", "-q", "-f", "raw", str(tmp), str(size_bytes))
    os.replace(tmp, dest)
    return dest
