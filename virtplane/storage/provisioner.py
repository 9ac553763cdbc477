"""Volumes of virtplane's built-in provisioners on the host: directories, image files, loop devices.

Layout under the storage root (one per cluster, `StorageRoot`):

    local/<node>/<pv-name>/disk.img      Filesystem volume of the node-local class (raw, sparse)
    local/<node>/<pv-name>/disk.qcow2    ... after a copy-on-write clone (qcow2 over a base, see below)
    local/<node>/<pv-name>/block.img     Block volume: the sparse file behind the volume's loop device
    local/<node>/.bases/<id>.img         read-only base images shared by copy-on-write clones
    local/<node>/.bases/<id>.refs/<pv>   one entry per volume whose chain goes through that base
    shared/<pv-name>/...                 the same for the shared (RWX) class, without the node level

The file *name* says the format, never the file's content: `disk.img` is raw (KubeVirt's convention) and
`disk.qcow2` is a qcow2 overlay written by us. A guest can write anything into its disk, so probing a
guest-writable file would let it pose as a qcow2 with a backing file of its choosing; a directory entry is
out of its reach. When both exist (a crash in the middle of a swap), `disk.qcow2` is the live one.

Everything here is host-local work with no API access, so the controller runs it today and a node agent
can run it later for the volumes of its own node.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

RAW_DISK = "disk.img"
QCOW2_DISK = "disk.qcow2"
BLOCK_FILE = "block.img"
BASES_DIR = ".bases"
MiB = 1 << 20
LOSETUP = "losetup"
QEMU_IMG = "qemu-img"
# KubeVirt/CDI's default share of a Filesystem volume kept free for the filesystem itself.
DEFAULT_FILESYSTEM_OVERHEAD = 0.06

VolumeMode = Literal["Filesystem", "Block"]
PoolKind = Literal["local", "shared", "hostpath"]
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class StorageError(Exception):
    """A volume operation failed; the message names the volume and the cause (chained)."""


class NoSpace(StorageError):
    """The host filesystem is full (ENOSPC)."""


def default_root() -> Path:
    """VIRTPLANE_STORAGE_ROOT, else $VIRTPLANE_DATA_DIR/storage, else ~/.virtplane/storage."""
    explicit = os.environ.get("VIRTPLANE_STORAGE_ROOT")
    if explicit:
        return Path(explicit).expanduser()
    data = os.environ.get("VIRTPLANE_DATA_DIR")
    base = Path(data).expanduser() if data else Path.home() / ".virtplane"
    return base / "storage"


def usable_size(capacity: int, mode: VolumeMode, overhead: float = DEFAULT_FILESYSTEM_OVERHEAD) -> int:
    """Bytes a disk image may use in a volume of `capacity`: all of a Block volume; for Filesystem the
    capacity less CDI's filesystem overhead, rounded down to whole MiB as CDI's importer does."""
    if mode == "Block":
        return capacity
    return max(MiB, int(capacity * (1.0 - overhead)) // MiB * MiB)


def required_capacity(virtual: int, mode: VolumeMode, overhead: float = DEFAULT_FILESYSTEM_OVERHEAD) -> int:
    """The smallest capacity whose usable size holds `virtual` bytes (the `storage:` API's inflation)."""
    if mode == "Block":
        return virtual
    cap = -(-int(virtual / (1.0 - overhead)) // MiB) * MiB
    while usable_size(cap, mode, overhead) < virtual:
        cap += MiB
    return cap


async def run(*argv: str, check: bool = True) -> tuple[int, str, str]:
    """Runs a host tool; StorageError carries its stderr when it fails."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as err:
        raise StorageError(f"cannot run {argv[0]}: {err}") from err
    out, err = await proc.communicate()
    code = proc.returncode or 0
    if check and code != 0:
        msg = err.decode(errors="replace").strip()
        if "No space left" in msg:
            raise NoSpace(f"{argv[0]} {argv[1] if len(argv) > 1 else ''}: {msg}")
        raise StorageError(f"{' '.join(argv[:2])} failed (exit {code}): {msg}")
    return code, out.decode(errors="replace"), err.decode(errors="replace")


# --------------------------------------------------------------------------------------------------
# loop devices


async def loop_devices() -> dict[str, str]:
    """Attached loop devices: backing file -> /dev/loopN."""
    _, out, _ = await run(LOSETUP, "--list", "--json", "--output", "NAME,BACK-FILE", check=False)
    try:
        rows = json.loads(out or "{}").get("loopdevices") or []
    except ValueError:
        return {}
    found: dict[str, str] = {}
    for row in rows:
        back = (row.get("back-file") or "").removesuffix(" (deleted)").strip()
        if back:
            found[back] = row.get("name") or ""
    return found


def _ensure_loop_nodes(count: int = 64) -> None:
    """Containers often ship /dev with only loop0-7: make the nodes LOOP_CTL_GET_FREE may hand out."""
    for i in range(count):
        node = Path(f"/dev/loop{i}")
        if node.exists():
            continue
        try:
            os.mknod(node, 0o660 | 0o060000, os.makedev(7, i))
        except OSError:
            return  # not allowed here (not root, or a devtmpfs that manages itself)


async def attach_loop(backing: Path) -> str:
    """The loop device over `backing`, attaching one when there is none (idempotent)."""
    existing = (await loop_devices()).get(str(backing))
    if existing:
        return existing
    with contextlib.suppress(OSError):
        _ensure_loop_nodes()
    _, out, _ = await run(LOSETUP, "--find", "--show", str(backing))
    device = out.strip()
    if not device.startswith("/dev/"):
        raise StorageError(f"losetup attached {backing} but printed {out!r}")
    return device


async def detach_loop(backing: Path) -> None:
    device = (await loop_devices()).get(str(backing))
    if device:
        await run(LOSETUP, "--detach", device)


# --------------------------------------------------------------------------------------------------
# volumes


@dataclasses.dataclass(frozen=True, slots=True)
class Volume:
    """One provisioned volume's place on the host."""

    directory: Path
    mode: VolumeMode

    @property
    def raw_disk(self) -> Path:
        return self.directory / RAW_DISK

    @property
    def qcow2_disk(self) -> Path:
        return self.directory / QCOW2_DISK

    @property
    def block_file(self) -> Path:
        return self.directory / BLOCK_FILE

    def disk(self) -> tuple[Path, Literal["raw", "qcow2"]]:
        """The live image of a Filesystem volume and its format (by name: see the module docstring)."""
        if self.qcow2_disk.exists():
            return self.qcow2_disk, "qcow2"
        return self.raw_disk, "raw"

    def data_path(self) -> tuple[Path, Literal["raw", "qcow2"]]:
        """Where the volume's bytes are read from on this host: the disk image, or the Block volume's file."""
        if self.mode == "Block":
            return self.block_file, "raw"
        return self.disk()

    def populated(self) -> bool:
        if self.mode == "Block":
            return self.block_file.exists()
        return self.raw_disk.exists() or self.qcow2_disk.exists()


@dataclasses.dataclass(frozen=True, slots=True)
class StorageRoot:
    """Where one cluster's built-in provisioners keep their volumes."""

    root: Path

    def pool(self, kind: PoolKind, node: str | None) -> Path:
        if kind == "local":
            if not node or not _NAME_RE.match(node):
                raise StorageError(f"a local volume needs a valid node name, not {node!r}")
            return self.root / "local" / node
        return self.root / kind

    def volume(self, kind: PoolKind, node: str | None, name: str, mode: VolumeMode) -> Volume:
        if not _NAME_RE.match(name):
            raise StorageError(f"invalid volume name {name!r}")
        return Volume(self.pool(kind, node) / name, mode)

    def volume_at(self, directory: Path, mode: VolumeMode) -> Volume:
        """A volume by its directory (from a PV), refusing paths outside this root."""
        directory = Path(directory)
        if not directory.is_relative_to(self.root):
            raise StorageError(f"{directory} is not under the storage root {self.root}")
        return Volume(directory, mode)


def _check_space(err: OSError, what: str) -> None:
    if err.errno == 28:  # ENOSPC
        raise NoSpace(f"{what}: no space left on the storage filesystem") from err


BACKUP_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def backup_path(directory: Path, name: str) -> Path:
    """Where a running VM's point-in-time copy of this volume goes (the node agent's `backup` action), for a
    clone to take: beside the volume, raw. `name` is a DNS label (BACKUP_NAME_RE), so never a path."""
    if not BACKUP_NAME_RE.fullmatch(name):
        raise StorageError(f"invalid backup name {name!r}")
    return directory / f"backup-{name}.img"


def volume_directory(disk: str | Path) -> Path:
    """The volume directory of a disk QEMU has open: the image file's directory, or for a Block volume's loop
    device the directory of the file behind it."""
    path = Path(disk)
    if path.parent == Path("/dev") and path.name.startswith("loop"):
        backing = Path(f"/sys/block/{path.name}/loop/backing_file").read_text().strip()
        return Path(backing).parent
    return path.parent


def prepare(volume: Volume) -> None:
    """An empty directory for the volume (leftovers of an interrupted attempt are removed)."""
    try:
        if volume.directory.exists():
            shutil.rmtree(volume.directory)
        volume.directory.mkdir(parents=True, mode=0o700)
    except OSError as err:
        _check_space(err, f"preparing {volume.directory}")
        raise StorageError(f"cannot prepare {volume.directory}: {err}") from err


def temp_path(volume: Volume) -> Path:
    """Where a population writes before the atomic rename that makes it visible."""
    final = volume.block_file if volume.mode == "Block" else volume.raw_disk
    return final.with_name(f".{final.name}.part")


def commit(volume: Volume, written: Path) -> Path:
    """Makes a fully written image the volume's data (rename, so nobody sees half a disk)."""
    final = volume.block_file if volume.mode == "Block" else volume.raw_disk
    os.replace(written, final)
    with contextlib.suppress(OSError):
        fd = os.open(volume.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return final


def create_sparse(path: Path, size: int, *, preallocate: bool = False) -> None:
    try:
        with open(path, "wb") as f:
            f.truncate(size)
            if preallocate:
                os.posix_fallocate(f.fileno(), 0, size)
    except OSError as err:
        path.unlink(missing_ok=True)
        _check_space(err, f"creating {path}")
        raise StorageError(f"cannot create {path}: {err}") from err


def create_blank(volume: Volume, capacity: int, *, preallocate: bool = False,
                 overhead: float = DEFAULT_FILESYSTEM_OVERHEAD) -> Path:
    """A blank volume: a sparse raw disk.img of the usable size, or the Block volume's backing file."""
    prepare(volume)
    tmp = temp_path(volume)
    create_sparse(tmp, usable_size(capacity, volume.mode, overhead), preallocate=preallocate)
    return commit(volume, tmp)


async def publish(volume: Volume) -> str:
    """The path a PV names: the directory (Filesystem) or the loop device (Block)."""
    if volume.mode == "Block":
        return await attach_loop(volume.block_file)
    return str(volume.directory)


async def expand(volume: Volume, capacity: int, *, overhead: float = DEFAULT_FILESYSTEM_OVERHEAD,
                 in_use: bool = False) -> bool:
    """Grows the volume to `capacity`; False when it has to wait (a qcow2 disk that QEMU has open)."""
    if volume.mode == "Block":
        size = capacity
        if volume.block_file.stat().st_size < size:
            os.truncate(volume.block_file, size)
        device = (await loop_devices()).get(str(volume.block_file))
        if device:
            await run(LOSETUP, "--set-capacity", device)
        return True
    disk, fmt = volume.disk()
    size = usable_size(capacity, volume.mode, overhead)
    if fmt == "raw":
        if disk.stat().st_size < size:
            os.truncate(disk, size)
        return True
    if in_use:
        return False  # qemu-img must not touch a qcow2 another process has open
    info = json.loads((await run(QEMU_IMG, "info", "--output=json", "-f", "qcow2", str(disk)))[1])
    if int(info.get("virtual-size", 0)) < size:
        await run(QEMU_IMG, "resize", "-f", "qcow2", str(disk), str(size))
    return True


async def delete(volume: Volume) -> None:
    """Releases the volume: loop device, files, its references on shared bases."""
    if volume.mode == "Block" or volume.block_file.exists():
        await detach_loop(volume.block_file)
    bases = volume.directory.parent / BASES_DIR
    name = volume.directory.name
    if volume.directory.exists():
        await asyncio.to_thread(shutil.rmtree, volume.directory, True)
    drop_refs(bases, name)


# --------------------------------------------------------------------------------------------------
# copy-on-write clones


def drop_refs(bases: Path, holder: str) -> None:
    """Forgets `holder`'s use of every base; deletes bases nobody uses any more (and their own chains)."""
    if not bases.is_dir():
        return
    changed = True
    while changed:
        changed = False
        for refs in bases.glob("*.refs"):
            entry = refs / holder
            if entry.exists() or entry.is_symlink():
                entry.unlink()
            if not any(refs.iterdir()):
                base_id = refs.name.removesuffix(".refs")
                (bases / f"{base_id}.img").unlink(missing_ok=True)
                (bases / f"{base_id}.qcow2").unlink(missing_ok=True)
                refs.rmdir()
                holder = f"base-{base_id}"  # the freed base may have held a base of its own
                changed = True
                break


def _add_ref(bases: Path, base_id: str, holder: str) -> None:
    refs = bases / f"{base_id}.refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / holder).touch()


async def _backing_base(path: Path, fmt: str) -> str | None:
    """The base id a qcow2 image of ours is backed by, if any."""
    if fmt != "qcow2":
        return None
    info = json.loads((await run(QEMU_IMG, "info", "--output=json", "-f", "qcow2", str(path)))[1])
    backing = info.get("backing-filename")
    if not backing:
        return None
    stem = Path(backing).name
    return stem.rsplit(".", 1)[0]


async def cow_clone(source: Volume, target: Volume, virtual_size: int) -> None:
    """Clones `source` into `target` in O(1): the source's image becomes a shared read-only base and both
    volumes get a qcow2 overlay over it. The source must not be in use (its disk file is swapped).

    Crash safety: the base is a hard link (the source stays intact until the final rename); the target is
    committed before the source's swap; a crash after the source's overlay appears but before the old raw
    file is gone leaves both files, and `disk.qcow2` wins.
    """
    if source.mode != "Filesystem" or target.mode != "Filesystem":
        raise StorageError("copy-on-write clones need Filesystem volumes")
    if source.directory.parent != target.directory.parent:
        raise StorageError("copy-on-write clones need both volumes in the same pool")
    disk, fmt = source.disk()
    if not disk.exists():
        raise StorageError(f"source volume {source.directory.name} has no disk image")
    bases = source.directory.parent / BASES_DIR
    bases.mkdir(exist_ok=True)
    base_id = uuid.uuid4().hex
    base = bases / f"{base_id}.{'qcow2' if fmt == 'qcow2' else 'img'}"
    os.link(disk, base)
    os.chmod(base, 0o444)
    parent = await _backing_base(disk, fmt)
    if parent:
        # the base now holds the source's old reference on its own backing base
        _add_ref(bases, parent, f"base-{base_id}")
    _add_ref(bases, base_id, source.directory.name)
    _add_ref(bases, base_id, target.directory.name)
    prepare(target)
    size = str(virtual_size)
    tmp = target.directory / f".{QCOW2_DISK}.part"
    await run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", fmt, str(tmp), size)
    os.replace(tmp, target.qcow2_disk)
    src_tmp = source.directory / f".{QCOW2_DISK}.part"
    src_size = json.loads((await run(QEMU_IMG, "info", "--output=json", "-f", fmt, str(base)))[1])["virtual-size"]
    await run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", fmt, str(src_tmp), str(src_size))
    os.replace(src_tmp, source.qcow2_disk)
    if fmt == "raw":
        source.raw_disk.unlink(missing_ok=True)
    if parent:
        _drop_one(bases, parent, source.directory.name)


def _drop_one(bases: Path, base_id: str, holder: str) -> None:
    """The source no longer references its old base directly (its new base does)."""
    entry = bases / f"{base_id}.refs" / holder
    entry.unlink(missing_ok=True)


def repair(volume: Volume) -> None:
    """After a crash during a swap: drop the stale raw image when a qcow2 overlay replaced it."""
    if volume.mode == "Filesystem" and volume.qcow2_disk.exists() and volume.raw_disk.exists():
        volume.raw_disk.unlink()
    for leftover in volume.directory.glob(".*.part") if volume.directory.is_dir() else ():
        leftover.unlink(missing_ok=True)
