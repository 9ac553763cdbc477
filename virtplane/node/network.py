"""Host side of a VMI's networks, until the networking issue brings CNI and real bindings.

Honest interim: the pod network's masquerade interface is QEMU's user-mode network (slirp) inside the QEMU
process, configured with KubeVirt's masquerade addressing — guest 10.0.2.2/24 by DHCP, gateway 10.0.2.1 — so
guests see exactly what they would see under KubeVirt's masquerade binding. What is missing: the pod's own
network namespace and IP, iptables DNAT of `ports` (inbound connections), and isolation between VMs (every
slirp instance is private to its VM, which is stricter, not looser). The bridge binding on the pod network
gets the same interim treatment; multus networks and SR-IOV need the network layer and are refused.

Opt-in per node (`virtplane node --pod-network cni`): the real pod network of virtplane.network — a netns per
VMI, the node's CNI chain run through the real plugins (pod IP from the node's pod CIDR), and KubeVirt's
masquerade binding inside that netns (bridge + tap whose fd QEMU inherits, dnsmasq DHCP, nftables NAT). The
default stays user mode until the CNI path has proven itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from virtplane.hypervisor.runtime import NetworkAttachment
from virtplane.network.pod import PodNetwork, PodNetworkError, interface_ports
from virtplane.network.services import DEFAULT_DOMAIN

from .status import MASQUERADE_CIDR, MASQUERADE_GATEWAY, MASQUERADE_GUEST_IP


class NetworkSetupError(Exception):
    """A network of the spec cannot be provided on this node (yet)."""


POD_BINDINGS = ("masquerade", "bridge")
POD_NETWORK_MODES = ("user", "cni")

# Set once at agent start by `virtplane node --pod-network cni` (None: the interim user-mode network).
_pod_network: PodNetwork | None = None


def configure_pod_network(mode: str, data_dir: Path, *, pod_cidr: str = "10.244.0.0/24",
                          cni_config: Path | None = None) -> None:  # fmt: skip
    global _pod_network
    if mode not in POD_NETWORK_MODES:
        raise ValueError(f"pod network mode must be one of {POD_NETWORK_MODES}")
    _pod_network = None if mode == "user" else PodNetwork(
        data_dir.expanduser().resolve() / "network", conf_file=cni_config, pod_cidr=pod_cidr)  # fmt: skip


def pod_network() -> PodNetwork | None:
    """The node's CNI pod network, None on the interim user-mode network."""
    return _pod_network


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
            kind = next(
                (
                    k
                    for k in iface
                    if k
                    not in (
                        "name",
                        "model",
                        "macAddress",
                        "bootOrder",
                        "pciAddress",
                        "ports",
                        "acpiIndex",
                        "state",
                        "dhcpOptions",
                    )
                ),
                "none",
            )
            raise NetworkSetupError(f"{field}: binding {kind!r} is not supported on this node yet")
        out[name] = _pod_attachment(vmi, iface)
    return out


def _pod_attachment(vmi: Mapping[str, Any], iface: Mapping[str, Any]) -> NetworkAttachment:
    if _pod_network is None or "masquerade" not in iface:
        return masquerade_attachment()  # interim user mode (also the bridge binding on CNI nodes, for now)
    fd = _tap_fds.get((vmi.get("metadata") or {}).get("uid", ""))
    if fd is None:
        raise NetworkSetupError("the pod network was not set up for this VMI")
    return NetworkAttachment.from_fd(fd)


def _masquerade_iface(vmi: Mapping[str, Any]) -> Mapping[str, Any] | None:
    spec = vmi.get("spec") or {}
    pod_nets = {n.get("name") for n in spec.get("networks") or [] if "pod" in n}
    for iface in ((spec.get("domain") or {}).get("devices") or {}).get("interfaces") or []:
        if iface.get("name") in pod_nets and "masquerade" in iface and iface.get("state") != "absent":
            return iface
    return None


def cluster_search(namespace: str, domain: str = DEFAULT_DOMAIN) -> list[str]:
    """The DNS search list a pod of `namespace` gets (the kubelet's ClusterFirst resolv.conf)."""
    return [f"{namespace}.svc.{domain}", f"svc.{domain}", domain]


# uid → our copy of the tap fd, from prepare() until QEMU has inherited it (release()).
_tap_fds: dict[str, int] = {}


async def prepare(vmi: Mapping[str, Any]) -> None:
    """On a CNI node: set up the pod network of the VMI's masquerade interface (idempotent while prepared).
    attachments() then hands QEMU its tap fd. On failure nothing is left behind; NetworkSetupError says why."""
    iface = _masquerade_iface(vmi)
    uid = vmi["metadata"]["uid"]
    if _pod_network is None or iface is None or uid in _tap_fds:
        return
    ns = (vmi.get("metadata") or {}).get("namespace") or "default"
    try:
        att = await _pod_network.setup(uid, interface_ports(iface), dns_search=cluster_search(ns))
    except PodNetworkError as err:
        raise NetworkSetupError(str(err)) from None
    assert att.tap_fd is not None
    _tap_fds[uid] = att.tap_fd


def release(uid: str) -> None:
    """Close our copy of the tap fd once QEMU has inherited it (or never will)."""
    fd = _tap_fds.pop(uid, None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


async def teardown(uid: str) -> None:
    """CNI DEL (releases the pod IP), stop the DHCP server, remove the netns; a no-op without a pod network."""
    release(uid)
    if _pod_network is not None and uid:
        await _pod_network.teardown(uid)


def pod_ip(uid: str) -> str | None:
    return _pod_network.pod_ip(uid) if _pod_network is not None else None
