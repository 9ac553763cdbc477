"""virtplane.hypervisor: from a KubeVirt VirtualMachineInstance to a running, controllable QEMU.

The node agent resolves what needs the cluster (volumes → files, networks → taps, kernelBoot → files,
cloud-init secrets → strings) and then uses this layer:

    probe = await probe_kvm()                                   # KVM only if a guest really runs on it
    check_supported(vmi["spec"])                                # [(field path, message)], for admission
    cidata = await build_for_volume(vmi, "cloudinitdisk", dir / "cidata.iso")
    m = Machine.create(vmi, RuntimeDir(dir), volumes, nets, probe.accel)
    await m.start()                                             # QEMU in its own session, QMP attached
    await m.pause(); await m.resume(); await m.powerdown(); await m.wait_exit()
    m = await Machine.adopt(RuntimeDir(dir))                    # after a node agent restart

Only stdlib, qemu.qmp and orjson are imported here (never the API server, store or client).
"""

from __future__ import annotations

from .accel import AccelProbe, probe_kvm
from .cloudinit import CloudInitData, build_configdrive, build_for_volume, build_nocloud
from .devices import (
    NON_HYPERVISOR_FIELDS,
    BuildOptions,
    LaunchPlan,
    block_node_names,
    build_command,
    check_supported,
    disk_device_id,
    nic_device_id,
    plan_launch,
    spec_hash,
)
from .errors import (
    CloudInitError,
    GuestAgentError,
    HypervisorError,
    InvalidSpecError,
    InvalidStateError,
    LaunchError,
    MissingResourceError,
    QMPCommandError,
    QMPConnectError,
    QMPDisconnectedError,
    QMPError,
    QMPTimeoutError,
    UnsupportedSpecError,
)
from .machine import ALLOWED, Machine, RunState
from .process import ExitInfo
from .qmp import QMP, EventStream, GuestAgent, QMPEvent
from .quantity import QuantityError, parse_bytes, parse_cpu, parse_quantity
from .runtime import KernelBootFiles, NetworkAttachment, ResolvedVolume, RuntimeDir
from .stats import BlockStats, MachineStats, NetStats

__all__ = [
    "ALLOWED",
    "NON_HYPERVISOR_FIELDS",
    "QMP",
    "AccelProbe",
    "BlockStats",
    "BuildOptions",
    "CloudInitData",
    "CloudInitError",
    "EventStream",
    "ExitInfo",
    "GuestAgent",
    "GuestAgentError",
    "HypervisorError",
    "InvalidSpecError",
    "InvalidStateError",
    "KernelBootFiles",
    "LaunchError",
    "LaunchPlan",
    "Machine",
    "MachineStats",
    "MissingResourceError",
    "NetStats",
    "NetworkAttachment",
    "QMPCommandError",
    "QMPConnectError",
    "QMPDisconnectedError",
    "QMPError",
    "QMPEvent",
    "QMPTimeoutError",
    "QuantityError",
    "ResolvedVolume",
    "RunState",
    "RuntimeDir",
    "UnsupportedSpecError",
    "block_node_names",
    "build_command",
    "build_configdrive",
    "build_for_volume",
    "build_nocloud",
    "check_supported",
    "disk_device_id",
    "nic_device_id",
    "parse_bytes",
    "parse_cpu",
    "parse_quantity",
    "plan_launch",
    "probe_kvm",
    "spec_hash",
]
