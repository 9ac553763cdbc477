"""Network interfaces: a netdev (the host side the network layer prepared) plus the guest NIC.

The binding (masquerade, bridge, passt, plugins) is the network layer's business: by the time we build the
command it has produced a tap device, an open tap fd or (passt) a unix socket per VMI network
(`NetworkAttachment`). `user` is QEMU's user-mode network, used only by this layer's own tests.

Without a macAddress we derive a stable locally administered one (52:54:00 prefix, like libvirt) from the
VMI's uid and the interface name: the guest keeps its MAC across restarts and adoption, and two VMs on one
bridge do not collide the way QEMU's default 52:54:00:12:34:56 would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

from ..errors import MissingResourceError
from ..runtime import NetworkAttachment
from .base import BuildContext, Issue, netdev_id, nic_device_id

JSON = dict[str, Any]

MODELS = {
    "virtio": "virtio-net-pci",
    "e1000": "e1000",
    "e1000e": "e1000e",
    "rtl8139": "rtl8139",
    "ne2k_pci": "ne2k_pci",
    "pcnet": "pcnet",
}
MAC_RE = re.compile(r"^([0-9A-Fa-f]{2})([:-][0-9A-Fa-f]{2}){5}$")


def normalize_mac(mac: str) -> str:
    return mac.replace("-", ":").lower()


def derived_mac(seed: str, iface_name: str) -> str:
    digest = hashlib.sha256(f"{seed}/{iface_name}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def check_interface(iface: JSON, path: str, *, network_names: set[str] | None = None) -> list[Issue]:
    issues: list[Issue] = []
    name = iface.get("name")
    if not name:
        issues.append(Issue(f"{path}.name", "required", "invalid"))
    elif network_names is not None and name not in network_names:
        issues.append(Issue(f"{path}.name", f"no network named {name!r}", "invalid"))
    model = iface.get("model") or "virtio"
    if model == "igb":
        issues.append(Issue(f"{path}.model", "igb needs QEMU ≥ 8.0; this host's QEMU has no igb device"))
    elif model not in MODELS:
        issues.append(Issue(f"{path}.model", f"unknown interface model {model!r}", "invalid"))
    mac = iface.get("macAddress")
    if mac is not None:
        if not MAC_RE.match(str(mac)):
            issues.append(Issue(f"{path}.macAddress", f"not a MAC address: {mac!r}", "invalid"))
        elif int(normalize_mac(mac)[:2], 16) & 1:
            issues.append(Issue(f"{path}.macAddress", "multicast MAC addresses cannot be used", "invalid"))
    boot = iface.get("bootOrder")
    if boot is not None and (not isinstance(boot, int) or isinstance(boot, bool) or boot < 1):
        issues.append(Issue(f"{path}.bootOrder", "must be an integer > 0", "invalid"))
    acpi = iface.get("acpiIndex")
    if acpi is not None and (not isinstance(acpi, int) or isinstance(acpi, bool) or not 1 <= acpi <= 16383):
        issues.append(Issue(f"{path}.acpiIndex", "must be an integer in 1..16383", "invalid"))
    state = iface.get("state")
    if state == "down":
        issues.append(Issue(f"{path}.state", "link state down is not supported"))
    elif state not in (None, "", "up", "absent"):
        issues.append(Issue(f"{path}.state", f"unknown state {state!r}", "invalid"))
    return issues


def check(spec: JSON, path: str) -> list[Issue]:
    issues: list[Issue] = []
    devices = (spec.get("domain") or {}).get("devices") or {}
    network_names = {n.get("name") for n in spec.get("networks") or [] if n.get("name")}
    seen: set[str] = set()
    macs: set[str] = set()
    for i, iface in enumerate(devices.get("interfaces") or []):
        ipath = f"{path}.domain.devices.interfaces[{i}]"
        issues += check_interface(iface, ipath, network_names=network_names)
        if iface.get("name") in seen:
            issues.append(Issue(f"{ipath}.name", f"duplicate interface name {iface['name']!r}", "invalid"))
        seen.add(iface.get("name"))
        mac = iface.get("macAddress")
        if mac and MAC_RE.match(str(mac)):
            if normalize_mac(mac) in macs:
                issues.append(Issue(f"{ipath}.macAddress", "duplicate MAC address", "invalid"))
            macs.add(normalize_mac(mac))
    if devices.get("networkInterfaceMultiqueue"):
        issues.append(Issue(f"{path}.domain.devices.networkInterfaceMultiqueue", "multiqueue NICs are not supported"))
    return issues


@dataclasses.dataclass(frozen=True, slots=True)
class NicPlan:
    name: str
    netdev: JSON
    device: JSON  # minus its bus placement
    fd: int | None = None  # an fd QEMU must inherit (fd attachments)


def plan_nic(
    iface: JSON, attachment: NetworkAttachment, *, mac_seed: str, transitional: bool = False,
    fd_name: str | None = None,
) -> NicPlan:
    """Pure mapping of one KubeVirt interface + its host side to a netdev and a NIC device.

    For fd attachments the netdev refers to `fd_name` when given (an fd passed over QMP with `getfd`, for
    hotplug), else to the fd number itself (inherited at start).
    """
    name = iface["name"]
    nd: JSON = {"id": netdev_id(name)}
    if attachment.kind == "user":
        nd["type"] = "user"
        nd.update(dict(attachment.user_options))
    elif attachment.kind == "stream":
        # passt's socket (QEMU >= 7.2): the helper listens, QEMU connects; frames carry a length prefix
        nd.update({"type": "stream", "server": False, "addr": {"type": "unix", "path": attachment.socket_path}})
    else:
        nd["type"] = "tap"
        if attachment.kind == "tap":
            nd.update({"ifname": attachment.tap_name, "script": "no", "downscript": "no"})
        else:
            nd["fd"] = fd_name or str(attachment.fd)
        if attachment.vhost:
            nd["vhost"] = True
    model = iface.get("model") or "virtio"
    driver = MODELS[model]
    if model == "virtio" and transitional:
        driver = "virtio-net-pci-transitional"
    mac = normalize_mac(iface["macAddress"]) if iface.get("macAddress") else derived_mac(mac_seed, name)
    device: JSON = {"driver": driver, "id": nic_device_id(name), "netdev": netdev_id(name), "mac": mac}
    if iface.get("bootOrder"):
        device["bootindex"] = int(iface["bootOrder"])
    else:
        # No PXE option ROM when the NIC is not a boot device: it costs seconds of firmware time under TCG.
        device["romfile"] = ""
    if iface.get("acpiIndex"):
        device["acpi-index"] = int(iface["acpiIndex"])
    return NicPlan(name=name, netdev=nd, device=device,
                   fd=attachment.fd if attachment.kind == "fd" and fd_name is None else None)


def build(ctx: BuildContext) -> None:
    devices = ctx.devices
    transitional = bool(devices.get("useVirtioTransitional"))
    seed = ctx.metadata.get("uid") or f"{ctx.metadata.get('namespace')}/{ctx.metadata.get('name')}"
    for i, iface in enumerate(devices.get("interfaces") or []):
        if iface.get("state") == "absent":
            continue  # KubeVirt: the interface is requested to be (or stay) unplugged
        try:
            attachment = ctx.nets[iface["name"]]
        except KeyError as err:
            raise MissingResourceError(
                f"spec.domain.devices.interfaces[{i}]: network {iface['name']!r} has no host attachment"
            ) from err
        plan = plan_nic(iface, attachment, mac_seed=seed, transitional=transitional)
        if plan.fd is not None:
            ctx.pass_fds.append(plan.fd)
        ctx.netdev(plan.netdev)
        device = dict(plan.device)
        device["bus"] = ctx.pci.allocate()
        ctx.device(device)
