"""Pure construction of what the node agent writes: VMI status fields, launcher pod status, guest-agent
answers in KubeVirt's JSON shapes. No I/O here, so every field can be unit-tested from plain dicts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from virtplane.api import clock
from virtplane.hypervisor.devices.interfaces import derived_mac, normalize_mac
from virtplane.network.pod import is_passt

JSON = dict[str, Any]

# VMI phases and condition types (KubeVirt's API values).
PENDING, SCHEDULING, SCHEDULED, RUNNING, SUCCEEDED, FAILED = (
    "Pending", "Scheduling", "Scheduled", "Running", "Succeeded", "Failed")  # fmt: skip
FINAL_PHASES = (SUCCEEDED, FAILED)
COND_READY = "Ready"
COND_PAUSED = "Paused"
COND_AGENT = "AgentConnected"
COND_SYNCHRONIZED = "Synchronized"
COND_SOFTWARE_EMULATION = "SoftwareEmulation"
# Condition types this agent owns on a VMI; the VMI controller owns the rest (PodScheduled, LiveMigratable, ...).
NODE_OWNED_CONDITIONS = (COND_READY, COND_PAUSED, COND_AGENT, COND_SYNCHRONIZED, COND_SOFTWARE_EMULATION)

REASON_PAUSED_BY_USER = "PausedByUser"
REASON_PAUSED_IO_ERROR = "PausedIOError"
REASON_GUEST_NOT_RUNNING = "GuestNotRunning"  # KubeVirt's reason for Ready=False while the guest is not running
REASON_PVC_NOT_FOUND = "FailedPvcNotFound"
REASON_SYNC_FAILED = "SyncFailed"
REASON_SOFTWARE_EMULATION = "KVMUnavailable"

FINALIZER = "foregroundDeleteVirtualMachine"
NODE_NAME_LABEL = "kubevirt.io/nodeName"

# KubeVirt's masquerade binding addressing: the guest always sees 10.0.2.2/24 behind gateway 10.0.2.1.
MASQUERADE_CIDR = "10.0.2.0/24"
MASQUERADE_GATEWAY = "10.0.2.1"
MASQUERADE_GUEST_IP = "10.0.2.2"


def now_rfc3339() -> str:
    return clock.now_rfc3339()


# -------------------------------------------------------------------------------------------------- conditions


def set_condition(
    conditions: Sequence[Mapping[str, Any]] | None,
    ctype: str,
    status: str,
    reason: str = "",
    message: str = "",
    *,
    now: str | None = None,
    probe: bool = False,
) -> list[JSON]:
    """A copy of `conditions` with `ctype` set; lastTransitionTime moves only when the status changes."""
    now = now or now_rfc3339()
    out: list[JSON] = []
    found = False
    for cond in conditions or []:
        cond = dict(cond)
        if cond.get("type") == ctype:
            found = True
            if cond.get("status") != status:
                cond["lastTransitionTime"] = now
            cond["status"] = status
            _set_or_drop(cond, "reason", reason)
            _set_or_drop(cond, "message", message)
            if probe:
                cond["lastProbeTime"] = now
        out.append(cond)
    if not found:
        cond = {"type": ctype, "status": status, "lastTransitionTime": now}
        if probe:
            cond["lastProbeTime"] = now
        _set_or_drop(cond, "reason", reason)
        _set_or_drop(cond, "message", message)
        out.append(cond)
    return out


def _set_or_drop(cond: JSON, key: str, value: str) -> None:
    if value:
        cond[key] = value
    else:
        cond.pop(key, None)


def remove_condition(conditions: Sequence[Mapping[str, Any]] | None, ctype: str) -> list[JSON]:
    return [dict(c) for c in conditions or [] if c.get("type") != ctype]


def get_condition(conditions: Sequence[Mapping[str, Any]] | None, ctype: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == ctype), None)


def add_phase_transition(status: JSON, phase: str, now: str | None = None) -> None:
    """Set `phase`, appending to phaseTransitionTimestamps when it changes (KubeVirt keeps one per change)."""
    if status.get("phase") == phase:
        return
    status["phase"] = phase
    stamps = list(status.get("phaseTransitionTimestamps") or [])
    stamps.append({"phase": phase, "phaseTransitionTimestamp": now or now_rfc3339()})
    status["phaseTransitionTimestamps"] = stamps


# ------------------------------------------------------------------------------------------------------- disks


def _letters(index: int) -> str:
    """0 → a, 25 → z, 26 → aa (libvirt's target naming)."""
    out = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        out = chr(ord("a") + rem) + out
    return out


def disk_targets(vmi: Mapping[str, Any]) -> dict[str, str]:
    """Disk name → guest target as libvirt names them: vda, vdb for virtio; sda, sdb for sata/scsi/usb."""
    devices = ((vmi.get("spec") or {}).get("domain") or {}).get("devices") or {}
    counters = {"vd": 0, "sd": 0}
    out: dict[str, str] = {}
    for disk in devices.get("disks") or []:
        kind = "cdrom" if "cdrom" in disk else "lun" if "lun" in disk else "disk"
        bus = (disk.get(kind) or {}).get("bus") or ("sata" if kind == "cdrom" else "virtio" if kind == "disk"
                                                  else "scsi")  # fmt: skip
        prefix = "vd" if bus == "virtio" else "sd"
        out[disk["name"]] = prefix + _letters(counters[prefix])
        counters[prefix] += 1
    return out


def volume_status(vmi: Mapping[str, Any], extra: Mapping[str, Mapping[str, Any]] | None = None) -> list[JSON]:
    """status.volumeStatus: one entry per volume with a disk (name, target, phase Ready), plus
    per-volume extras (containerDiskVolume checksum, persistentVolumeClaimInfo, size)."""
    targets = disk_targets(vmi)
    out: list[JSON] = []
    for vol in (vmi.get("spec") or {}).get("volumes") or []:
        name = vol.get("name")
        if name not in targets:
            continue
        entry: JSON = {"name": name, "target": targets[name], "phase": "Ready", "reason": "VolumeReady",
                       "message": "Volume is ready"}  # fmt: skip
        entry.update(dict((extra or {}).get(name) or {}))
        out.append(entry)
    return out


# -------------------------------------------------------------------------------------------------- interfaces


@dataclasses.dataclass(frozen=True, slots=True)
class GuestInterface:
    """One entry of guest-network-get-interfaces, reduced to what status needs."""

    name: str
    mac: str
    ips: tuple[str, ...]

    @classmethod
    def parse(cls, reply: Sequence[Mapping[str, Any]]) -> list[GuestInterface]:
        out = []
        for iface in reply or []:
            mac = normalize_mac(str(iface.get("hardware-address") or ""))
            if not mac or mac == "00:00:00:00:00:00":
                continue  # loopback
            ips = tuple(
                str(a["ip-address"]) for a in iface.get("ip-addresses") or []
                if a.get("ip-address") and not str(a["ip-address"]).startswith("fe80:")
            )  # fmt: skip
            out.append(cls(name=str(iface.get("name") or ""), mac=mac, ips=ips))
        return out


def interface_macs(vmi: Mapping[str, Any]) -> dict[str, str]:
    """Interface name → MAC as the hypervisor layer assigns it (spec macAddress, else derived from the uid)."""
    meta = vmi.get("metadata") or {}
    seed = meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}"
    devices = ((vmi.get("spec") or {}).get("domain") or {}).get("devices") or {}
    out = {}
    for iface in devices.get("interfaces") or []:
        if iface.get("state") == "absent":
            continue
        mac = iface.get("macAddress")
        out[iface["name"]] = normalize_mac(mac) if mac else derived_mac(seed, iface["name"])
    return out


def interfaces_status(
    vmi: Mapping[str, Any],
    guest: Sequence[GuestInterface] | None,
    *,
    masquerade_ip: str = MASQUERADE_GUEST_IP,
    binding_ips: Mapping[str, str] | None = None,
) -> list[JSON]:
    """status.interfaces: name, mac, IPs, guest interface name, infoSource.

    Without a guest agent the IP of a masquerade interface is still known: the binding hands the guest
    10.0.2.2 by DHCP (infoSource `domain`). With the agent, its view is merged in (`domain, guest-agent`).
    """
    devices = ((vmi.get("spec") or {}).get("domain") or {}).get("devices") or {}
    by_mac = {g.mac: g for g in guest or []}
    out: list[JSON] = []
    for name, mac in interface_macs(vmi).items():
        spec_iface = next((i for i in devices.get("interfaces") or [] if i.get("name") == name), {})
        entry: JSON = {"name": name, "mac": mac, "infoSource": "domain", "linkState": "up"}
        ips: list[str] = []
        if "masquerade" in spec_iface or is_passt(spec_iface):  # passt: the guest has the pod IP itself
            ips = [masquerade_ip]
        elif binding_ips and name in binding_ips:
            ips = [binding_ips[name]]  # a bridge binding's DHCP hands the guest this (a NAD's IPAM address)
        g = by_mac.get(mac)
        if g is not None:
            entry["infoSource"] = "domain, guest-agent"
            entry["interfaceName"] = g.name
            ips = list(dict.fromkeys([*ips, *g.ips]))
        if ips:
            entry["ipAddress"] = ips[0]
            entry["ipAddresses"] = ips
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------------------- guest agent


def guest_os_info(osinfo: Mapping[str, Any] | None) -> JSON:
    """guest-get-osinfo → VirtualMachineInstanceGuestOSInfo (status.guestOSInfo, guestosinfo's `os`)."""
    if not osinfo:
        return {}
    mapping = {"name": "name", "kernel-release": "kernelRelease", "version": "version",
               "pretty-name": "prettyName", "version-id": "versionId", "kernel-version": "kernelVersion",
               "machine": "machine", "id": "id"}  # fmt: skip
    return {ours: str(osinfo[theirs]) for theirs, ours in mapping.items() if osinfo.get(theirs)}


def users_list(users: Sequence[Mapping[str, Any]] | None) -> JSON:
    """guest-get-users → VirtualMachineInstanceGuestOSUserList."""
    items = []
    for u in users or []:
        item: JSON = {"userName": str(u.get("user") or "")}
        if u.get("domain"):
            item["domain"] = str(u["domain"])
        if u.get("login-time") is not None:
            item["loginTime"] = float(u["login-time"])
        items.append(item)
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceGuestOSUserList",
            "metadata": {}, "items": items}  # fmt: skip


def filesystems(fsinfo: Sequence[Mapping[str, Any]] | None) -> list[JSON]:
    """guest-get-fsinfo → VirtualMachineInstanceFileSystem entries."""
    out = []
    for fs in fsinfo or []:
        disks = fs.get("disk") or []
        disk_name = str(fs.get("name") or "")
        if disks and isinstance(disks[0], Mapping) and disks[0].get("dev"):
            disk_name = str(disks[0]["dev"]).removeprefix("/dev/")
        out.append({
            "diskName": disk_name,
            "mountPoint": str(fs.get("mountpoint") or ""),
            "fileSystemType": str(fs.get("type") or ""),
            "usedBytes": int(fs.get("used-bytes") or 0),
            "totalBytes": int(fs.get("total-bytes") or 0),
        })  # fmt: skip
    return out


def filesystem_list(fsinfo: Sequence[Mapping[str, Any]] | None) -> JSON:
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceFileSystemList", "metadata": {},
            "items": filesystems(fsinfo)}  # fmt: skip


def guest_agent_info(
    info: Mapping[str, Any] | None,
    osinfo: Mapping[str, Any] | None,
    *,
    hostname: str = "",
    timezone: Mapping[str, Any] | None = None,
    users: Sequence[Mapping[str, Any]] | None = None,
    fsinfo: Sequence[Mapping[str, Any]] | None = None,
    frozen: bool | None = None,
) -> JSON:
    """VirtualMachineInstanceGuestAgentInfo (the guestosinfo subresource)."""
    out: JSON = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceGuestAgentInfo"}
    if info:
        out["guestAgentVersion"] = str(info.get("version") or "")
        commands = info.get("supported_commands") or []
        out["supportedCommands"] = [{"name": str(c.get("name")), "enabled": bool(c.get("enabled"))} for c in commands]
    if hostname:
        out["hostname"] = hostname
    out["os"] = guest_os_info(osinfo)
    if timezone:
        zone = str(timezone.get("zone") or "UTC")
        out["timezone"] = f"{zone}, {int(timezone.get('offset') or 0)}"
    out["userList"] = users_list(users)["items"]
    out["fsInfo"] = {"disks": filesystems(fsinfo)}
    if frozen is not None:
        out["fsFreezeStatus"] = "frozen" if frozen else "thawed"
    return out


# ------------------------------------------------------------------------------------------------- launcher pod


def launcher_pod_status(
    old: Mapping[str, Any] | None,
    *,
    phase: str,
    host_ip: str,
    pod_ip: str,
    started_at: str | None,
    finished_at: str | None = None,
    exit_code: int = 0,
    reason: str = "",
    message: str = "",
    now: str | None = None,
) -> JSON:
    """The kubelet's view of the virt-launcher pod: phase, conditions, the `compute` container's state.

    Conditions other than the kubelet's own (PodScheduled from the scheduler) are kept.
    """
    now = now or now_rfc3339()
    old = old or {}
    status: JSON = {k: v for k, v in old.items() if k not in ("phase", "containerStatuses", "reason", "message")}
    status["phase"] = phase
    status["hostIP"] = host_ip
    status["hostIPs"] = [{"ip": host_ip}]
    status["podIP"] = pod_ip
    status["podIPs"] = [{"ip": pod_ip}]
    status.setdefault("startTime", started_at or now)
    status["qosClass"] = status.get("qosClass") or "Burstable"
    running = phase == "Running"
    ready = "True" if running else "False"
    conds = list(status.get("conditions") or [])
    conds = set_condition(conds, "Initialized", "True", now=now)
    conds = set_condition(conds, "PodReadyToStartContainers", "True" if running else "False", now=now)
    conds = set_condition(conds, "ContainersReady", ready, "" if running else "ContainersNotReady", now=now)
    conds = set_condition(conds, "Ready", ready, "" if running else "ContainersNotReady", now=now)
    if not any(c.get("type") == "PodScheduled" for c in conds):
        conds = set_condition(conds, "PodScheduled", "True", now=now)
    status["conditions"] = conds
    if running:
        state: JSON = {"running": {"startedAt": started_at or now}}
    elif phase in ("Succeeded", "Failed"):
        state = {"terminated": {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                                "startedAt": started_at or now, "finishedAt": finished_at or now}}  # fmt: skip
        if message:
            state["terminated"]["message"] = message
    else:
        state = {"waiting": {"reason": reason or "ContainerCreating"}}
    status["containerStatuses"] = [{
        "name": "compute", "ready": running, "started": running, "restartCount": 0, "state": state,
        "image": "virtplane/virt-launcher", "imageID": "", "containerID": "",
    }]  # fmt: skip
    if reason and phase in ("Failed",):
        status["reason"] = reason
    if message and phase in ("Failed",):
        status["message"] = message
    return status
