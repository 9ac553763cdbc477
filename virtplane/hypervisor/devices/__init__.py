"""From a KubeVirt VirtualMachineInstance to a QEMU command line, one module per device kind.

Public entry points:
- `check_supported(vmi_spec, prefix="spec")`: every (field path, message) this layer cannot honour, for
  admission to reject up front (422);
- `build_command(vmi, runtime, volumes, nets, accel)`: the argv, or `UnsupportedSpecError` / `InvalidSpecError`;
- `plan_launch(...)`: the argv plus what launching needs besides it (fds to pass, files to seed, spec hash).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from ..runtime import KernelBootFiles, NetworkAttachment, ResolvedVolume, RuntimeDir
from . import (
    balloon,
    channels,
    disks,
    firmware,
    graphics,
    inputs,
    interfaces,
    machine,
    memory,
    rng,
    serial,
    watchdog,
)
from .base import (
    BALLOON_ID,
    SCSI_CONTROLLER_ID,
    USB_CONTROLLER_ID,
    VIRTIO_SERIAL_ID,
    BlockNodeNames,
    BuildContext,
    Issue,
    block_node_names,
    disk_device_id,
    hotplug_port_id,
    netdev_id,
    nic_device_id,
    opt_escape,
    vcpu_topology,
)
from .disks import DiskPlan, plan_disk
from .interfaces import NicPlan, plan_nic
from .support import NON_HYPERVISOR_FIELDS, VMI_SPEC, walk

JSON = dict[str, Any]
QEMU_BINARY = "qemu-system-x86_64"

# Order matters only for readability of the command line and for `head` options other modules extend
# (firmware appends pflash to -machine).
_MODULES = (machine, memory, firmware, disks, interfaces, serial, channels, graphics, inputs, rng, watchdog, balloon)

__all__ = [
    "BALLOON_ID",
    "NON_HYPERVISOR_FIELDS",
    "QEMU_BINARY",
    "SCSI_CONTROLLER_ID",
    "USB_CONTROLLER_ID",
    "VIRTIO_SERIAL_ID",
    "BlockNodeNames",
    "BuildOptions",
    "DiskPlan",
    "Issue",
    "LaunchPlan",
    "NicPlan",
    "block_node_names",
    "build_command",
    "check_issues",
    "check_supported",
    "disk_device_id",
    "hotplug_port_id",
    "netdev_id",
    "nic_device_id",
    "plan_disk",
    "plan_launch",
    "plan_nic",
    "spec_hash",
    "vcpu_topology",
]


@dataclasses.dataclass(frozen=True, slots=True)
class BuildOptions:
    qemu_binary: str = QEMU_BINARY
    # Empty PCIe root ports created at start for disk/NIC hotplug (q35 cannot hotplug into pcie.0).
    hotplug_ports: int = 4
    virtio_console_log: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class LaunchPlan:
    argv: tuple[str, ...]
    pass_fds: tuple[int, ...]
    # (template, destination) files to copy before the first start when the destination is missing.
    seed_files: tuple[tuple[str, str], ...]
    spec_hash: str
    accel: str
    hotplug_ports: tuple[str, ...]
    has_scsi_controller: bool


def spec_hash(vmi: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the VMI spec: lets the node agent tell whether a running QEMU was
    started from the spec it now sees."""
    return hashlib.sha256(orjson.dumps(vmi.get("spec") or {}, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _boot_order_issues(spec: JSON, path: str) -> list[Issue]:
    issues: list[Issue] = []
    devices = (spec.get("domain") or {}).get("devices") or {}
    seen: dict[int, str] = {}
    for kind in ("disks", "interfaces"):
        for i, dev in enumerate(devices.get(kind) or []):
            order = dev.get("bootOrder")
            if not isinstance(order, int) or isinstance(order, bool):
                continue
            field = f"{path}.domain.devices.{kind}[{i}].bootOrder"
            if order in seen:
                issues.append(Issue(field, f"boot order {order} is also used by {seen[order]}", "invalid"))
            else:
                seen[order] = field
    return issues


def check_issues(vmi_spec: Mapping[str, Any], prefix: str = "spec") -> list[Issue]:
    if not isinstance(vmi_spec, Mapping):
        return [Issue(prefix, "must be an object", "invalid")]
    spec = dict(vmi_spec)
    issues = walk(spec, VMI_SPEC, prefix)
    if not spec.get("domain"):
        issues.append(Issue(f"{prefix}.domain", "required", "invalid"))
        return issues
    for module in _MODULES:
        issues += module.check(spec, prefix)
    issues += _boot_order_issues(spec, prefix)
    # One entry per field: the shape walk and a module may both flag the same path.
    unique: dict[tuple[str, str], Issue] = {}
    for issue in issues:
        unique.setdefault((issue.field, issue.message), issue)
    return list(unique.values())


def check_supported(vmi_spec: Mapping[str, Any], prefix: str = "spec") -> list[tuple[str, str]]:
    """(field path, message) for everything in the spec this hypervisor layer cannot run.

    `prefix` is the path of the spec in the checked object: "spec" for a VMI, "spec.template.spec" for a VM.
    Empty means the spec can be built (given resolved volumes and networks).
    """
    if isinstance(vmi_spec, dict):
        try:
            key = orjson.dumps(_without_valid_uuid(vmi_spec), option=orjson.OPT_SORT_KEYS)
            return list(_supported_issues(prefix, key))
        except TypeError:  # not plain JSON data: check it as it is
            pass
    return [i.as_tuple() for i in check_issues(vmi_spec, prefix)]


_ANY_UUID = "00000000-0000-0000-0000-000000000000"


def _without_valid_uuid(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as the memo sees it: admission defaults firmware.uuid per VM (from its name), and a valid one
    changes no finding (firmware.check only rejects a malformed one), so all valid UUIDs share an entry."""
    domain = spec.get("domain")
    firmware = domain.get("firmware") if isinstance(domain, dict) else None
    uid = firmware.get("uuid") if isinstance(firmware, dict) else None
    if not isinstance(uid, str) or uid == _ANY_UUID:
        return spec
    try:
        uuid.UUID(uid)
    except ValueError:
        return spec
    assert isinstance(domain, dict) and isinstance(firmware, dict)
    return {**spec, "domain": {**domain, "firmware": {**firmware, "uuid": _ANY_UUID}}}


@functools.lru_cache(maxsize=256)
def _supported_issues(prefix: str, spec_json: bytes) -> tuple[tuple[str, str], ...]:
    """check_issues is a pure function of the spec's content, and admission runs it on every write of a
    VM or VMI, mostly with specs it has seen (templates, pools, a VM's status updates): memoized on the
    canonical JSON, which costs a few microseconds against a few hundred for the walk."""
    return tuple(i.as_tuple() for i in check_issues(orjson.loads(spec_json), prefix))


def plan_launch(
    vmi: Mapping[str, Any],
    runtime: RuntimeDir,
    volumes: Mapping[str, ResolvedVolume],
    nets: Mapping[str, NetworkAttachment],
    accel: str,
    *,
    kernel_boot: KernelBootFiles | None = None,
    options: BuildOptions | None = None,
) -> LaunchPlan:
    if accel not in ("kvm", "tcg"):
        raise ValueError(f"accel must be kvm or tcg, not {accel!r}")
    options = options or BuildOptions()
    issues = check_issues(vmi.get("spec") or {}, "spec")
    if issues:
        raise issues[0].to_error()
    ctx = BuildContext(
        vmi=dict(vmi), runtime=runtime, volumes=volumes, nets=nets, accel=accel, kernel_boot=kernel_boot,
        hotplug_ports=options.hotplug_ports, virtio_console_log=options.virtio_console_log,
    )  # fmt: skip
    for module in _MODULES:
        module.build(ctx)
    spares = ctx.pci.add_spares(options.hotplug_ports)
    qmp = f"socket,id=charmonitor,path={opt_escape(str(runtime.qmp_sock))},server=on,wait=off"
    argv = [
        options.qemu_binary,
        *ctx.head,
        "-nodefaults", "-no-user-config", "-display", "none",
        "-msg", "timestamp=on",
        # Start with the vCPUs stopped: the Machine connects QMP and listens for events before the guest runs,
        # then issues `cont` (or stays paused for startStrategy: Paused).
        "-S",
        # A guest shutdown pauses QEMU instead of exiting it: the Machine sees SHUTDOWN, then either quits QEMU
        # (exit 0, Stopped) or, for a guest-visible reboot it asked for, resets and continues. A QEMU found
        # in this state after a node agent restart is known to have shut down cleanly.
        "-action", "shutdown=pause",
        "-chardev", qmp, "-mon", "chardev=charmonitor,id=monitor,mode=control",
        *ctx.pci.root_port_args(),
        *ctx.body,
    ]  # fmt: skip
    return LaunchPlan(
        argv=tuple(argv),
        pass_fds=tuple(ctx.pass_fds),
        seed_files=tuple(ctx.seed_files),
        spec_hash=spec_hash(vmi),
        accel=accel,
        hotplug_ports=tuple(spares),
        has_scsi_controller=ctx.has_scsi_controller,
    )


def build_command(
    vmi: Mapping[str, Any],
    runtime: RuntimeDir,
    volumes: Mapping[str, ResolvedVolume],
    nets: Mapping[str, NetworkAttachment],
    accel: str,
    *,
    kernel_boot: KernelBootFiles | None = None,
    options: BuildOptions | None = None,
) -> list[str]:
    """The QEMU argv for a VMI (see `plan_launch` for what else launching needs)."""
    return list(plan_launch(vmi, runtime, volumes, nets, accel, kernel_boot=kernel_boot, options=options).argv)
