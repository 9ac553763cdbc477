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
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from virtplane.hypervisor.runtime import NetworkAttachment
from virtplane.network import cni, netns
from virtplane.network.pod import PodNetwork, PodNetworkError, interface_ports, is_passt
from virtplane.network.services import DEFAULT_DOMAIN
from virtplane.node.status import interface_macs

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
        if "multus" in network and "pod" not in network:
            if "bridge" not in iface:
                kind = next((b for b in ("masquerade", "sriov", "passt", "binding") if b in iface), "none")
                raise NetworkSetupError(f"{field}: binding {kind!r} on a multus network is not supported "
                                        f"(bridge only)")  # fmt: skip
            fd = _sec_fds.get((_uid(vmi), name))
            if fd is None:
                raise NetworkSetupError(f"{field}: multus network {name!r} was not set up for this VMI")
            out[name] = NetworkAttachment.from_fd(fd)
            continue
        if "pod" not in network:
            kind = next((k for k in network if k != "name"), "unknown")
            raise NetworkSetupError(f"{field}: {kind} networks are not supported on this node yet")
        binding = "passt" if is_passt(iface) else next((b for b in POD_BINDINGS if b in iface), None)
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
    uid = (vmi.get("metadata") or {}).get("uid", "")
    if is_passt(iface):
        if uid not in _passt_sockets:
            raise NetworkSetupError("the passt binding needs the CNI pod network on this node (virtplane node "
                                    "--pod-network cni)" if _pod_network is None else
                                    "the pod network was not set up for this VMI")  # fmt: skip
        return NetworkAttachment.stream(_passt_sockets[uid])
    if _pod_network is None or "masquerade" not in iface:
        return masquerade_attachment()  # interim user mode (also the bridge binding on CNI nodes, for now)
    fd = _tap_fds.get(uid)
    if fd is None:
        raise NetworkSetupError("the pod network was not set up for this VMI")
    return NetworkAttachment.from_fd(fd)


def _masquerade_iface(vmi: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The pod network's interface when its binding is one the CNI pod network sets up (masquerade, passt)."""
    spec = vmi.get("spec") or {}
    pod_nets = {n.get("name") for n in spec.get("networks") or [] if "pod" in n}
    for iface in ((spec.get("domain") or {}).get("devices") or {}).get("interfaces") or []:
        if iface.get("name") in pod_nets and ("masquerade" in iface or is_passt(iface)) \
                and iface.get("state") != "absent":
            return iface
    return None


def cluster_search(namespace: str, domain: str = DEFAULT_DOMAIN) -> list[str]:
    """The DNS search list a pod of `namespace` gets (the kubelet's ClusterFirst resolv.conf)."""
    return [f"{namespace}.svc.{domain}", f"svc.{domain}", domain]


# uid → our copy of the tap fd, from prepare() until QEMU has inherited it (release()).
_tap_fds: dict[str, int] = {}
# uid → passt's socket (the passt binding), from prepare() until teardown().
_passt_sockets: dict[str, str] = {}
# (uid, interface name) → our copy of a multus network's tap fd, likewise.
_sec_fds: dict[tuple[str, str], int] = {}


def _uid(vmi: Mapping[str, Any]) -> str:
    return str((vmi.get("metadata") or {}).get("uid", ""))


def multus_interfaces(vmi: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(interface name, NAD reference) of the VMI's multus networks, in interface order (pod ifnames net1..)."""
    spec = vmi.get("spec") or {}
    nets = {n.get("name"): n for n in spec.get("networks") or []}
    out = []
    for iface in ((spec.get("domain") or {}).get("devices") or {}).get("interfaces") or []:
        net = nets.get(iface.get("name")) or {}
        if iface.get("state") != "absent" and "multus" in net and "pod" not in net:
            out.append((str(iface["name"]), str((net.get("multus") or {}).get("networkName") or "")))
    return out


# A NetworkAttachmentDefinition lookup: (namespace, name) → the NAD object (raises NetworkSetupError).
NADGetter = Callable[[str, str], Awaitable[Mapping[str, Any]]]


async def prepare(vmi: Mapping[str, Any], get_nad: NADGetter | None = None, *, keep_ip: str | None = None,
                  container_id: str | None = None) -> None:  # fmt: skip
    """On a CNI node: set up the pod network of the VMI's masquerade interface and its multus (bridge binding)
    networks (idempotent while prepared). attachments() then hands QEMU the tap fds. On failure nothing is
    left behind; NetworkSetupError says why. `keep_ip`/`container_id`: a live migration's target, which keeps
    the VMI's pod IP from the source (PodNetwork.setup)."""
    iface = _masquerade_iface(vmi)
    uid = _uid(vmi)
    secondaries = multus_interfaces(vmi)
    if uid in _tap_fds or uid in _passt_sockets:
        return
    if secondaries and (_pod_network is None or iface is None):
        raise NetworkSetupError("multus networks need the CNI pod network on this node (virtplane node "
                                "--pod-network cni) and a masquerade pod interface")  # fmt: skip
    if _pod_network is None or iface is None:
        return
    ns = (vmi.get("metadata") or {}).get("namespace") or "default"
    binding = "passt" if is_passt(iface) else "masquerade"
    kept = {"keep_ip": keep_ip, "container_id": container_id} if keep_ip else {}
    try:
        att = await _pod_network.setup(uid, interface_ports(iface), dns_search=cluster_search(ns), binding=binding,
                                       **kept)  # fmt: skip
    except PodNetworkError as err:
        raise NetworkSetupError(str(err)) from None
    if att.socket is not None:
        _passt_sockets[uid] = att.socket
    else:
        assert att.tap_fd is not None
        _tap_fds[uid] = att.tap_fd
    try:
        for i, (name, ref) in enumerate(secondaries, start=1):
            nad_ns, _, nad_name = ref.rpartition("/")
            if get_nad is None:
                raise NetworkSetupError(f"network {name!r}: no NetworkAttachmentDefinition lookup on this node")
            nad = await get_nad(nad_ns or ns, nad_name)
            try:
                conflist = cni.parse_config(str((nad.get("spec") or {}).get("config") or ""))
                fd, _ip = await _pod_network.attach_secondary(uid, f"net{i}", conflist,
                                                              guest_mac=interface_macs(vmi).get(name))
            except (cni.CNIError, PodNetworkError, netns.NetnsError, OSError, ValueError) as err:
                raise NetworkSetupError(f"network {name!r} (NetworkAttachmentDefinition {nad_ns or ns}/"
                                        f"{nad_name}): {err}") from None  # fmt: skip
            _sec_fds[(uid, name)] = fd
    except NetworkSetupError:
        await teardown(uid)  # nothing half-configured: the netns, the pod IP and every NAD's IP go
        raise


def boot_nics(vmi: Mapping[str, Any]) -> dict[str, str]:
    """The multus NICs a VMI starts with: interface name → pod interface (net1, net2, ... as prepare() made)."""
    return {name: f"net{i}" for i, (name, _ref) in enumerate(multus_interfaces(vmi), start=1)}


class NicPlugger(Protocol):
    async def hotplug_nic(self, iface: Mapping[str, Any], attachment: NetworkAttachment) -> str: ...
    async def unplug_nic(self, name: str, timeout: float = 30.0) -> None: ...  # noqa: ASYNC109


async def reconcile_nics(vmi: Mapping[str, Any], plugged: dict[str, str], machine: NicPlugger,
                         get_nad: NADGetter) -> list[str]:  # fmt: skip
    """Declarative NIC hotplug (KubeVirt 1.x): a multus interface (bridge binding) added to a running VMI's
    spec gets the NAD's network in the launcher netns and a virtio NIC over QMP; one marked `state: absent`
    (or gone from the spec) is unplugged and its network removed. `plugged` (interface → pod ifname) is
    updated in place. Returns what could not be done (for events; retried on the next sync)."""
    if _pod_network is None:
        return []
    uid = _uid(vmi)
    spec = vmi.get("spec") or {}
    ifaces = {i.get("name"): i for i in ((spec.get("domain") or {}).get("devices") or {}).get("interfaces") or []}
    wanted = dict(multus_interfaces(vmi))
    errors: list[str] = []
    for name in [n for n in plugged if n not in wanted]:
        try:
            await machine.unplug_nic(name)
        except Exception as err:  # the guest did not let go (yet): keep it, try again
            errors.append(f"unplugging interface {name!r}: {err}")
            continue
        errors += await _pod_network.detach_secondary(uid, plugged.pop(name))
    ns = (vmi.get("metadata") or {}).get("namespace") or "default"
    for name, ref in wanted.items():
        if name in plugged:
            continue
        if "bridge" not in (ifaces.get(name) or {}):
            errors.append(f"interface {name!r}: only the bridge binding can be hotplugged")
            continue
        used = set(plugged.values())
        ifname = next(f"net{i}" for i in range(1, 64) if f"net{i}" not in used)
        nad_ns, _, nad_name = ref.rpartition("/")
        try:
            nad = await get_nad(nad_ns or ns, nad_name)
            conflist = cni.parse_config(str((nad.get("spec") or {}).get("config") or ""))
            fd, _ip = await _pod_network.attach_secondary(uid, ifname, conflist,
                                                          guest_mac=interface_macs(vmi).get(name))
        except (NetworkSetupError, cni.CNIError, PodNetworkError, netns.NetnsError, OSError, ValueError) as err:
            await _pod_network.detach_secondary(uid, ifname)
            errors.append(f"interface {name!r}: {err}")
            continue
        try:
            await machine.hotplug_nic(ifaces[name], NetworkAttachment.from_fd(fd))
        except Exception as err:
            await _pod_network.detach_secondary(uid, ifname)
            errors.append(f"hotplugging interface {name!r}: {err}")
            continue
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)  # QEMU has its own copy (getfd) or never will
        plugged[name] = ifname
    return errors


def release(uid: str) -> None:
    """Close our copies of the tap fds once QEMU has inherited them (or never will)."""
    fds = [_tap_fds.pop(uid, None)] + [_sec_fds.pop(k) for k in [k for k in _sec_fds if k[0] == uid]]
    for fd in fds:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


async def teardown(uid: str, *, keep_ip: bool = False, owner: Mapping[str, str] | None = None,
                   release_kept: bool = False) -> None:  # fmt: skip
    """CNI DEL (releases the pod IP), stop the DHCP server, remove the netns; a no-op without a pod network.
    `keep_ip`: a live migration moved the guest away with its pod IP (kept reserved, PodNetwork.teardown);
    `release_kept`: the VMI ends here, so an IP this node kept for it since it moved away is released too."""
    release(uid)
    _passt_sockets.pop(uid, None)
    if _pod_network is not None and uid:
        await _pod_network.teardown(uid, keep_ip=keep_ip, owner=owner, release=release_kept)


async def activate(uid: str) -> None:
    """A migration target took the guest over: route the kept pod IP to it on this node."""
    if _pod_network is not None and uid:
        try:
            await _pod_network.activate(uid)
        except netns.NetnsError as err:
            raise NetworkSetupError(f"routing the kept pod IP: {err}") from None


def binding_ips(uid: str, nics: Mapping[str, str]) -> dict[str, str]:
    """Interface name → the address its bridge binding hands the guest (multus NICs with a NAD IPAM)."""
    if _pod_network is None or not nics:
        return {}
    by_ifname = _pod_network.secondary_ips(uid)
    return {name: by_ifname[ifname] for name, ifname in nics.items() if ifname in by_ifname}


def pod_ip(uid: str) -> str | None:
    return _pod_network.pod_ip(uid) if _pod_network is not None else None


def pod_conflist() -> dict[str, Any] | None:
    """The node's CNI chain when the CNI pod network is on (pods of the node use it too), else None."""
    return _pod_network.conflist() if _pod_network is not None else None
