"""Host side of a VMI's networks, until the networking issue brings CNI and real bindings.

Honest interim: the pod network's masquerade interface is QEMU's user-mode network (slirp) inside the QEMU
process, configured with KubeVirt's masquerade addressing — guest 10.0.2.2/24 by DHCP, gateway 10.0.2.1 — so
guests see exactly what they would see under KubeVirt's masquerade binding. What is missing: the pod's own
network namespace and IP, iptables DNAT of `ports` (inbound connections), and isolation between VMs (every
slirp instance is private to its VM, which is stricter, not looser). The bridge binding on the pod network
gets the same interim treatment; multus networks and SR-IOV need the network layer and are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from virtplane.hypervisor.runtime import NetworkAttachment

from .status import MASQUERADE_CIDR, MASQUERADE_GATEWAY, MASQUERADE_GUEST_IP


class NetworkSetupError(Exception):
    """A network of the spec cannot be provided on this node (yet)."""


POD_BINDINGS = ("masquerade", "bridge")


def masquerade_attachment() -> NetworkAttachment:
    return NetworkAttachment.user(net=MASQUERADE_CIDR, host=MASQUERADE_GATEWAY, dhcpstart=MASQUERADE_GUEST_IP)


def attachments(vmi: Mapping[str, Any]) -> dict[str, NetworkAttachment]:
    """Interface name → host attachment for every interface of the spec (absent ones are skipped)."""
    spec = vmi.get("spec") or {}
    networks = {n.get("name"): n for n in spec.get("networks") or []}
    out: dict[str, NetworkAttachment] = {}
    for i, iface in enumerate(((spec.get("domain") or {}).get("devices") or {}).get("interfaces") or []):
        if iface.get("state") == "absent":
            continue
        name = iface.get("name")
        field = f"spec.domain.devices.interfaces[{i}]"
        network = networks.get(name)
        if network is None:
            raise NetworkSetupError(f"{field}: no network named {name!r}")
        if "pod" not in network:
            kind = next((k for k in network if k != "name"), "unknown")
            raise NetworkSetupError(f"{field}: {kind} networks are not supported on this node yet (pod only)")
        binding = next((b for b in POD_BINDINGS if b in iface), None)
        if binding is None:
            kind = next((k for k in iface if k not in ("name", "model", "macAddress", "bootOrder", "pciAddress",
                                                     "ports", "acpiIndex", "state", "dhcpOptions")), "none")
            raise NetworkSetupError(f"{field}: binding {kind!r} is not supported on this node yet")
        out[name] = masquerade_attachment()
    return out
