"""Disks and CD-ROMs: -blockdev node pairs (protocol + format) and the guest-visible device.

Node names are derived from the volume name (`f-<volume>` / `d-<volume>`, see `block_node_names`) and
device ids from the disk name (`disk-<name>`), so hotplug/unplug and a re-attached node agent can address
them without any saved state.

Buses (KubeVirt → QEMU on q35):
- virtio: virtio-blk-pci, each on its own PCIe root port (so it can be unplugged);
- sata: the q35 built-in AHCI controller's six ports `ide.0`..`ide.5` (ide-hd / ide-cd);
- scsi: one virtio-scsi-pci controller `scsi0` with scsi-hd / scsi-cd;
- usb: usb-storage on the xHCI controller.

Cache modes follow libvirt: none = O_DIRECT with a guest-visible write cache (guest flushes reach the
disk), writethrough = host page cache, no guest write cache, writeback = host page cache + guest write
cache. Without a cache field KubeVirt picks none when the file system supports O_DIRECT, else writethrough.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from ..errors import UnsupportedSpecError
from ..runtime import ResolvedVolume
from .base import (
    SCSI_CONTROLLER_ID,
    USB_CONTROLLER_ID,
    BuildContext,
    Issue,
    block_node_names,
    disk_device_id,
)

JSON = dict[str, Any]

DISK_BUSES = ("virtio", "sata", "scsi", "usb")
CDROM_BUSES = ("sata", "scsi")
CACHE_MODES = ("none", "writethrough", "writeback")
IO_MODES = ("native", "threads", "default")
ERROR_POLICIES = {  # errorPolicy → (werror, rerror)
    "stop": ("stop", "stop"),
    "ignore": ("ignore", "ignore"),
    "report": ("report", "report"),
    "enospace": ("enospc", "report"),
}
SATA_PORTS = 6
SERIAL_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
_BLOCK_SIZES = tuple(2**i for i in range(9, 16))  # 512 .. 32768


def disk_kind(disk: JSON) -> str:
    """'disk' or 'cdrom' (KubeVirt defaulting adds `disk: {}` when neither is given)."""
    return "cdrom" if "cdrom" in disk else "disk"


def disk_bus(disk: JSON) -> str:
    kind = disk_kind(disk)
    target = disk.get(kind) or {}
    return target.get("bus") or ("sata" if kind == "cdrom" else "virtio")


def disk_readonly(disk: JSON) -> bool:
    kind = disk_kind(disk)
    value = (disk.get(kind) or {}).get("readonly")
    if value is None:
        return kind == "cdrom"  # KubeVirt: CD-ROMs default to read-only
    return bool(value)


def check_disk(disk: JSON, path: str, *, volume_names: set[str] | None = None) -> list[Issue]:
    """Checks of one disk entry (also used for hotplug requests)."""
    issues: list[Issue] = []
    name = disk.get("name")
    if not name:
        issues.append(Issue(f"{path}.name", "required", "invalid"))
    elif volume_names is not None and name not in volume_names and disk_kind(disk) != "cdrom":
        # A CD-ROM without a volume is an empty drive (KubeVirt's DeclarativeHotplugVolumes): media come later.
        issues.append(Issue(f"{path}.name", f"no volume named {name!r}", "invalid"))
    kinds = [k for k in ("disk", "cdrom", "lun") if k in disk]
    if len(kinds) > 1:
        issues.append(Issue(path, "only one of disk, cdrom, lun may be set", "invalid"))
    kind = disk_kind(disk)
    bus = disk_bus(disk)
    if kind == "cdrom":
        if bus == "virtio":
            issues.append(Issue(f"{path}.cdrom.bus", "virtio CD-ROMs do not exist; use sata or scsi", "invalid"))
        elif bus not in CDROM_BUSES:
            issues.append(Issue(f"{path}.cdrom.bus", f"unsupported CD-ROM bus {bus!r}"))
        if (disk["cdrom"] or {}).get("tray", "closed") != "closed":
            issues.append(Issue(f"{path}.cdrom.tray", "an open tray (no medium) is not supported"))
        if (disk["cdrom"] or {}).get("readonly") is False:
            issues.append(Issue(f"{path}.cdrom.readonly", "CD-ROMs are read-only", "invalid"))
    else:
        if bus not in DISK_BUSES:
            issues.append(Issue(f"{path}.disk.bus", f"unsupported disk bus {bus!r}", "invalid"))
        elif bus == "sata" and disk_readonly(disk):
            # QEMU's ide-hd refuses read-only block nodes (ATA has no write-protect for hard disks).
            issues.append(Issue(f"{path}.disk.readonly", "read-only disks are not supported on the sata bus"))
    cache = disk.get("cache")
    if cache is not None and cache not in CACHE_MODES:
        issues.append(Issue(f"{path}.cache", f"unknown cache mode {cache!r}", "invalid"))
    io = disk.get("io")
    if io is not None and io not in IO_MODES:
        issues.append(Issue(f"{path}.io", f"unknown io mode {io!r}", "invalid"))
    if io == "native" and cache not in (None, "none"):
        issues.append(Issue(f"{path}.io", "io: native needs cache: none (O_DIRECT)", "invalid"))
    policy = disk.get("errorPolicy")
    if policy is not None and policy not in ERROR_POLICIES:
        issues.append(Issue(f"{path}.errorPolicy", f"unknown error policy {policy!r}", "invalid"))
    serial = disk.get("serial")
    if serial is not None and not SERIAL_RE.match(str(serial)):
        issues.append(Issue(f"{path}.serial", "only letters, digits and _ . + - are allowed", "invalid"))
    boot = disk.get("bootOrder")
    if boot is not None and (not isinstance(boot, int) or isinstance(boot, bool) or boot < 1):
        issues.append(Issue(f"{path}.bootOrder", "must be an integer > 0", "invalid"))
    if disk.get("dedicatedIOThread") and bus != "virtio":
        issues.append(Issue(f"{path}.dedicatedIOThread", "IO threads are only supported on the virtio bus"))
    custom = (disk.get("blockSize") or {}).get("custom")
    if custom is not None:
        for key in ("logical", "physical"):
            if custom.get(key) not in _BLOCK_SIZES:
                issues.append(Issue(f"{path}.blockSize.custom.{key}", "must be a power of two in 512..32768",
                                    "invalid"))
        if custom.get("discardGranularity") is not None and not isinstance(custom["discardGranularity"], int):
            issues.append(Issue(f"{path}.blockSize.custom.discardGranularity", "must be an integer", "invalid"))
    return issues


def check(spec: JSON, path: str) -> list[Issue]:
    issues: list[Issue] = []
    domain = spec.get("domain") or {}
    devices = domain.get("devices") or {}
    volume_names = {v.get("name") for v in spec.get("volumes") or [] if v.get("name")}
    seen: set[str] = set()
    sata = 0
    for i, disk in enumerate(devices.get("disks") or []):
        dpath = f"{path}.domain.devices.disks[{i}]"
        issues += check_disk(disk, dpath, volume_names=volume_names)
        if disk.get("name") in seen:
            issues.append(Issue(f"{dpath}.name", f"duplicate disk name {disk['name']!r}", "invalid"))
        seen.add(disk.get("name"))
        if disk_bus(disk) == "sata":
            sata += 1
            if sata > SATA_PORTS:
                issues.append(Issue(f"{dpath}", f"q35 has {SATA_PORTS} SATA ports; use virtio or scsi"))
    policy = domain.get("ioThreadsPolicy")
    if policy == "supplementalPool":
        issues.append(Issue(f"{path}.domain.ioThreadsPolicy", "supplementalPool is not supported"))
    elif policy not in (None, "shared", "auto"):
        issues.append(Issue(f"{path}.domain.ioThreadsPolicy", f"unknown policy {policy!r}", "invalid"))
    return issues


@dataclasses.dataclass(frozen=True, slots=True)
class DiskPlan:
    """What one disk becomes: block nodes to add (in order) and the device, minus its bus placement."""

    name: str
    bus: str
    kind: str
    nodes: tuple[JSON, ...]
    device: JSON

    @property
    def device_id(self) -> str:
        return self.device["id"]


def _cache(disk: JSON, volume: ResolvedVolume) -> str:
    if disk.get("cache"):
        return disk["cache"]
    return "none" if volume.supports_direct_io else "writethrough"


def plan_disk(
    disk: JSON,
    volume: ResolvedVolume,
    *,
    field: str = "spec.domain.devices.disks[]",
    vcpus: int = 1,
    transitional: bool = False,
    iothread: str | None = None,
    multiqueue: bool = False,
) -> DiskPlan:
    """Pure mapping of one KubeVirt disk + its resolved volume to block nodes and a device."""
    name = disk["name"]
    kind = disk_kind(disk)
    bus = disk_bus(disk)
    readonly = disk_readonly(disk) or volume.readonly
    if readonly and kind == "disk" and bus == "sata":
        raise UnsupportedSpecError(f"{field}.disk.bus", f"volume {name!r} is read-only; sata disks cannot be")
    cache = _cache(disk, volume)
    if disk.get("io") == "native" and cache != "none":
        raise UnsupportedSpecError(f"{field}.io", "io: native needs O_DIRECT (cache: none)")
    cache_opts = {"direct": cache == "none", "no-flush": False}
    names = block_node_names(name)
    proto: JSON = {
        "driver": "host_device" if volume.is_block_device else "file",
        "filename": str(volume.path),
        "node-name": names.file,
        "cache": cache_opts,
        "read-only": readonly,
        "discard": "unmap",
    }
    if disk.get("io") in ("native", "threads"):
        proto["aio"] = disk["io"]
    if disk.get("shareable"):
        proto["locking"] = "off"  # several VMs write it; they must coordinate (cluster file systems)
    fmt: JSON = {
        "driver": volume.format,
        "file": names.file,
        "node-name": names.format,
        "cache": cache_opts,
        "read-only": readonly,
        "discard": "unmap",
    }

    driver = {
        ("disk", "virtio"): "virtio-blk-pci-transitional" if transitional else "virtio-blk-pci",
        ("disk", "sata"): "ide-hd",
        ("disk", "scsi"): "scsi-hd",
        ("disk", "usb"): "usb-storage",
        ("cdrom", "sata"): "ide-cd",
        ("cdrom", "scsi"): "scsi-cd",
    }[(kind, bus)]
    device: JSON = {"driver": driver, "id": disk_device_id(name), "drive": names.format}
    if kind == "disk":
        device["write-cache"] = "off" if cache == "writethrough" else "on"
    if disk.get("bootOrder"):
        device["bootindex"] = int(disk["bootOrder"])
    if disk.get("serial"):
        device["serial"] = str(disk["serial"])
    if disk.get("shareable"):
        device["share-rw"] = True
    policy = disk.get("errorPolicy") or "stop"
    if driver != "usb-storage" and kind == "disk":
        werror, rerror = ERROR_POLICIES[policy]
        device["werror"] = werror
        device["rerror"] = rerror
    custom = (disk.get("blockSize") or {}).get("custom")
    if custom:
        device["logical_block_size"] = int(custom["logical"])
        device["physical_block_size"] = int(custom["physical"])
        if custom.get("discardGranularity") is not None:
            device["discard_granularity"] = int(custom["discardGranularity"])
    if bus == "virtio":
        if iothread:
            device["iothread"] = iothread
        if multiqueue:
            device["num-queues"] = max(1, vcpus)
    return DiskPlan(name=name, bus=bus, kind=kind, nodes=(proto, fmt), device=device)


def empty_cdrom(disk: JSON) -> DiskPlan:
    """A CD-ROM drive with no medium (no drive property): `Machine.change_medium` inserts one later."""
    bus = disk_bus(disk)
    driver = "ide-cd" if bus == "sata" else "scsi-cd"
    device: JSON = {"driver": driver, "id": disk_device_id(disk["name"])}
    if disk.get("bootOrder"):
        device["bootindex"] = int(disk["bootOrder"])
    return DiskPlan(name=disk["name"], bus=bus, kind="cdrom", nodes=(), device=device)


def needs_scsi_controller(devices: Mapping[str, Any]) -> bool:
    """Always when hotplug is allowed: KubeVirt hotplugs volumes as SCSI disks by default."""
    if any(disk_bus(d) == "scsi" for d in devices.get("disks") or []):
        return True
    return not devices.get("disableHotplug")


def build(ctx: BuildContext) -> None:
    devices = ctx.devices
    transitional = bool(devices.get("useVirtioTransitional"))
    policy = ctx.domain.get("ioThreadsPolicy")
    shared_iothread: str | None = None
    if policy in ("shared", "auto"):
        # "auto" distributes disks over a pool in KubeVirt; one shared thread is the small-VM equivalent.
        shared_iothread = "iothread-shared"
        ctx.object({"qom-type": "iothread", "id": shared_iothread})

    if needs_scsi_controller(devices):
        scsi: JSON = {"driver": "virtio-scsi-pci-transitional" if transitional else "virtio-scsi-pci",
                      "id": SCSI_CONTROLLER_ID, "bus": ctx.pci.allocate()}
        if shared_iothread:
            scsi["iothread"] = shared_iothread
        ctx.device(scsi)
        ctx.has_scsi_controller = True

    sata_port = 0
    scsi_target = 0
    volume_names = {v.get("name") for v in ctx.spec.get("volumes") or []}
    for i, disk in enumerate(devices.get("disks") or []):
        field = f"spec.domain.devices.disks[{i}]"
        if disk_kind(disk) == "cdrom" and disk["name"] not in volume_names:
            plan = empty_cdrom(disk)
            device = dict(plan.device)
            if plan.bus == "sata":
                device["bus"] = f"ide.{sata_port}"
                sata_port += 1
            else:
                device.update({"bus": f"{SCSI_CONTROLLER_ID}.0", "channel": 0, "scsi-id": scsi_target, "lun": 0})
                scsi_target += 1
            ctx.device(device)
            continue
        volume = ctx.volume(disk["name"], field)
        iothread = shared_iothread
        if disk.get("dedicatedIOThread"):
            iothread = f"iothread-{disk['name']}"
            ctx.object({"qom-type": "iothread", "id": iothread})
        plan = plan_disk(
            disk, volume, field=field, vcpus=ctx.vcpus, transitional=transitional,
            iothread=iothread if disk_bus(disk) == "virtio" else None,
            multiqueue=bool(devices.get("blockMultiQueue")),
        )  # fmt: skip
        for node in plan.nodes:
            ctx.blockdev(node)
        device = dict(plan.device)
        if plan.bus == "virtio":
            device["bus"] = ctx.pci.allocate()
        elif plan.bus == "sata":
            device["bus"] = f"ide.{sata_port}"
            sata_port += 1
        elif plan.bus == "scsi":
            device.update({"bus": f"{SCSI_CONTROLLER_ID}.0", "channel": 0, "scsi-id": scsi_target, "lun": 0})
            scsi_target += 1
        else:
            ctx.ensure_usb_controller()
            device["bus"] = f"{USB_CONTROLLER_ID}.0"
        ctx.device(device)
