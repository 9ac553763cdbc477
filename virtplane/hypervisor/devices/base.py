"""Shared machinery of the device modules: the build context, argument helpers, PCIe slot allocation.

Every device module exposes two functions:

- `check(spec: dict, path: str) -> list[Issue]`: what of its part of the VMI spec it cannot honour
  (field path + message). `check_supported` collects these; builders may assume a checked spec.
- `build(ctx: BuildContext) -> None`: append its QEMU arguments to the context.

Devices, block nodes, netdevs and objects are given to QEMU as JSON (`-device {...}`), which QEMU ≥ 6.2
accepts and which needs no comma escaping for user-controlled strings (serials, paths). Options that have
no JSON form (`-chardev`, `-smbios`, `-name`) go through `opt_escape`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import orjson

from ..errors import InvalidSpecError, MissingResourceError, UnsupportedSpecError
from ..quantity import QuantityError, parse_cpu
from ..runtime import KernelBootFiles, NetworkAttachment, ResolvedVolume, RuntimeDir

JSON = dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Issue:
    """One reason a spec cannot be run. `kind` is "unsupported" (valid KubeVirt, not implemented here) or
    "invalid" (contradictory / dangling reference)."""

    field: str
    message: str
    kind: str = "unsupported"

    def as_tuple(self) -> tuple[str, str]:
        return (self.field, self.message)

    def to_error(self) -> UnsupportedSpecError | InvalidSpecError:
        if self.kind == "invalid":
            return InvalidSpecError(self.field, self.message)
        return UnsupportedSpecError(self.field, self.message)


def opt_escape(value: str) -> str:
    """Escape a value for QEMU's `key=value,...` option syntax (a literal comma is written twice)."""
    return value.replace(",", ",,")


def as_json(obj: JSON) -> str:
    return orjson.dumps(obj).decode()


def short_id(prefix: str, name: str, limit: int) -> str:
    """`prefix + name`, or a truncated, hash-suffixed form when that is longer than `limit` characters.

    Deterministic, so the node agent can name the same node/device again (hotplug, unplug, adoption).
    """
    full = f"{prefix}{name}"
    if len(full) <= limit:
        return full
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{prefix}{name[: limit - len(prefix) - 9]}-{digest}"


# QEMU block node names are stored in a 32-byte buffer (31 characters).
_NODE_NAME_LIMIT = 31


@dataclasses.dataclass(frozen=True, slots=True)
class BlockNodeNames:
    file: str  # protocol node (file / host_device)
    format: str  # format node (qcow2 / raw): what the guest device's `drive` points to


def block_node_names(volume_name: str) -> BlockNodeNames:
    return BlockNodeNames(
        file=short_id("f-", volume_name, _NODE_NAME_LIMIT),
        format=short_id("d-", volume_name, _NODE_NAME_LIMIT),
    )


def disk_device_id(disk_name: str) -> str:
    return f"disk-{disk_name}"


def nic_device_id(iface_name: str) -> str:
    return f"net-{iface_name}"


def netdev_id(iface_name: str) -> str:
    return f"netdev-{iface_name}"


def hotplug_port_id(index: int) -> str:
    return f"hp{index}"


# Controller ids other modules and the Machine refer to.
SCSI_CONTROLLER_ID = "scsi0"
USB_CONTROLLER_ID = "usb"
VIRTIO_SERIAL_ID = "virtio-serial0"
BALLOON_ID = "balloon0"


class PciAllocator:
    """Gives every PCI Express device its own pcie-root-port, as libvirt does on q35.

    Why: on q35 a device plugged straight into the root complex (pcie.0) is an integrated endpoint and
    cannot be hot-unplugged; behind a root port it can (hot-unplugging a NIC that was there at boot). Root
    ports are packed 8 to a slot as multifunction devices starting at slot 2, so a VM with many devices
    still fits in pcie.0's 32 slots. Spare ports (`hp0`, `hp1`, ...) stay empty for hotplug.
    """

    FIRST_SLOT = 2
    LAST_SLOT = 0x1E  # 0x1f is the ICH9 LPC/SATA/SMBus function block

    def __init__(self) -> None:
        self._ports: list[tuple[str, bool]] = []  # (port id, is spare)

    def allocate(self) -> str:
        """A new root port for one device; returns the bus name to plug the device into."""
        port_id = f"rp{sum(1 for _, spare in self._ports if not spare)}"
        self._add(port_id, spare=False)
        return port_id

    def add_spares(self, count: int) -> list[str]:
        ids = [hotplug_port_id(i) for i in range(count)]
        for port_id in ids:
            self._add(port_id, spare=True)
        return ids

    def _add(self, port_id: str, spare: bool) -> None:
        if len(self._ports) >= (self.LAST_SLOT - self.FIRST_SLOT + 1) * 8:
            raise InvalidSpecError("spec.domain.devices", "too many PCI devices for one PCIe root complex")
        self._ports.append((port_id, spare))

    def root_port_args(self) -> list[str]:
        args: list[str] = []
        for index, (port_id, _spare) in enumerate(self._ports):
            slot, function = divmod(index, 8)
            dev: JSON = {
                "driver": "pcie-root-port",
                "id": port_id,
                "bus": "pcie.0",
                "addr": f"{self.FIRST_SLOT + slot:#x}.{function:#x}",
                "chassis": index + 1,
                "port": 0x10 + index,
            }
            if function == 0:
                dev["multifunction"] = True
            args += ["-device", as_json(dev)]
        return args


@dataclasses.dataclass(slots=True)
class BuildContext:
    """Everything a device module needs, plus the argument lists being built."""

    vmi: JSON
    runtime: RuntimeDir
    volumes: Mapping[str, ResolvedVolume]
    nets: Mapping[str, NetworkAttachment]
    accel: str  # "kvm" or "tcg"
    kernel_boot: KernelBootFiles | None = None
    hotplug_ports: int = 4
    virtio_console_log: bool = True
    head: list[str] = dataclasses.field(default_factory=list)  # machine, cpu, memory, firmware, ...
    body: list[str] = dataclasses.field(default_factory=list)  # devices, after the root ports
    pci: PciAllocator = dataclasses.field(default_factory=PciAllocator)
    pass_fds: list[int] = dataclasses.field(default_factory=list)
    # (template, destination): files to copy into the runtime dir before the first start (OVMF vars).
    seed_files: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    # Set by the disk module: the virtio-scsi controller exists (hotplug of scsi disks needs it).
    has_scsi_controller: bool = False
    has_usb_controller: bool = False

    @property
    def spec(self) -> JSON:
        return self.vmi.get("spec") or {}

    @property
    def domain(self) -> JSON:
        return self.spec.get("domain") or {}

    @property
    def devices(self) -> JSON:
        return self.domain.get("devices") or {}

    @property
    def metadata(self) -> JSON:
        return self.vmi.get("metadata") or {}

    @property
    def is_efi(self) -> bool:
        return "efi" in ((self.domain.get("firmware") or {}).get("bootloader") or {})

    @property
    def vcpus(self) -> int:
        return vcpu_topology(self.domain)[0]

    def device(self, dev: JSON) -> None:
        self.body += ["-device", as_json(dev)]

    def blockdev(self, node: JSON) -> None:
        self.body += ["-blockdev", as_json(node)]

    def netdev(self, nd: JSON) -> None:
        self.body += ["-netdev", as_json(nd)]

    def object(self, obj: JSON) -> None:
        self.body += ["-object", as_json(obj)]

    def volume(self, name: str, field: str) -> ResolvedVolume:
        try:
            return self.volumes[name]
        except KeyError as err:
            raise MissingResourceError(f"{field}: volume {name!r} was not resolved to a file") from err

    def ensure_usb_controller(self) -> None:
        if not self.has_usb_controller:
            self.device({"driver": "qemu-xhci", "id": USB_CONTROLLER_ID, "bus": self.pci.allocate()})
            self.has_usb_controller = True


def vcpu_topology(domain: JSON) -> tuple[int, int, int, int]:
    """(vcpus, sockets, cores, threads), KubeVirt's rules: explicit topology wins; otherwise the vCPU count
    comes from resources.limits.cpu, else requests.cpu (rounded up), laid out as sockets; default 1."""
    cpu = domain.get("cpu") or {}
    sockets, cores, threads = (int(cpu.get(k) or 0) for k in ("sockets", "cores", "threads"))
    if not (sockets or cores or threads):
        resources = domain.get("resources") or {}
        amount: Fraction | None = None
        for section in ("limits", "requests"):
            value = (resources.get(section) or {}).get("cpu")
            if value is not None:
                try:
                    amount = parse_cpu(value)
                except QuantityError:
                    amount = None  # reported by the machine module's check
                break
        count = max(1, -(-amount.numerator // amount.denominator)) if amount else 1
        return count, count, 1, 1
    sockets, cores, threads = sockets or 1, cores or 1, threads or 1
    return sockets * cores * threads, sockets, cores, threads


def enabled(feature: JSON | None, default: bool = True) -> bool:
    """KubeVirt FeatureState: present means enabled unless `enabled: false`."""
    if feature is None:
        return default
    value = feature.get("enabled")
    return True if value is None else bool(value)


def virtio_driver(ctx: BuildContext, driver: str) -> str:
    """devices.useVirtioTransitional: the transitional (legacy + modern) variant for old guests (RHEL 6)."""
    return f"{driver}-transitional" if ctx.devices.get("useVirtioTransitional") else driver
