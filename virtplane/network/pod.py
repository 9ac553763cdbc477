"""The pod network of a virt-launcher "pod" and KubeVirt's masquerade binding inside it.

Per VMI: a network namespace `vp-<uid8>`; the node's CNI chain (default: bridge `vp0` + host-local IPAM from
the node's pod CIDR) ADDed into it as eth0, which gives the pod IP; then, as KubeVirt's masquerade binding
does inside virt-launcher: a bridge `k6t-eth0` (10.0.2.1/24) with a tap for QEMU, dnsmasq on that bridge
handing the guest 10.0.2.2/24 (gateway 10.0.2.1), and nftables NAT — guest traffic leaving eth0 is
masqueraded to the pod IP, connections to the pod IP on the interface's `ports` (all ports when there are
none) are DNATed to the guest.

KubeVirt's passt binding instead: after the same CNI ADD, `passt` runs in the netns and QEMU connects to its
unix socket; passt gives the guest the pod IP itself (DHCP, the netns' gateway and routes) and forwards the
interface's `ports` (all when there are none) from the pod IP to the guest. No bridge, tap, dnsmasq or NAT.

What a teardown needs (the CNI config that was ADDed, the dnsmasq and passt pids) is written to a state file
per VMI, so DEL works after an agent restart too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import cni, netns

log = logging.getLogger(__name__)

POD_IFNAME = "eth0"
BRIDGE = "k6t-eth0"
TAP = "tap0"
GATEWAY = "10.0.2.1"
GUEST_IP = "10.0.2.2"
PREFIX = 24
# routes the node agent adds for pod IPs that moved (a live-migrated VMI keeps its IP): `ip route ... proto 97`,
# so an agent can tell its own routes from anyone else's, also after a restart
ROUTE_PROTO = "97"


class PodNetworkError(Exception):
    """Setting up (or tearing down) a pod network failed; the message is meant for VMI status."""


def netns_name(uid: str, node: str = "") -> str:
    """`vp-<uid8>[-<node>]`. Names are host-wide (/run/netns) and node agents may share a host: during a live
    migration the source and the target node both hold a netns for the same VMI, so each node adds its tag."""
    base = f"vp-{uid.replace('-', '')[:8]}"
    return f"{base}-{node}" if node else base


def default_conflist(pod_cidr: str, state_dir: Path, bridge: str = "vp0") -> dict[str, Any]:
    """bridge + host-local, like the reference CNI config of kubeadm clusters; the host side of the bridge is
    the pods' gateway (isGateway), so the node reaches its pods directly."""
    net = ipaddress.ip_network(pod_cidr, strict=True)
    return {
        "cniVersion": "1.0.0", "name": "virtplane-pod",
        "plugins": [{
            "type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False, "hairpinMode": True,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": str(net)}]],
                     "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(state_dir / "ipam")},
        }],
    }  # fmt: skip


@dataclasses.dataclass(slots=True)
class PodAttachment:
    uid: str
    netns: str
    pod_ip: str
    tap_fd: int | None  # owned by the caller: close it once QEMU has it
    socket: str | None = None  # the passt binding: the unix socket QEMU connects to


def nft_rules(pod_ip: str, ports: Sequence[tuple[str, int]], *, snat: bool = False) -> str:
    """The masquerade binding's NAT (KubeVirt's virt-launcher rules, in nftables form). `snat`: the guest's
    traffic leaves from `pod_ip` explicitly (a migrated VMI's kept IP, beside the netns' own link address)
    rather than from whatever address the route picks."""
    if ports:
        by_proto: dict[str, list[int]] = {}
        for proto, port in ports:
            by_proto.setdefault(proto.lower(), []).append(port)
        dnat = "\n".join(
            f'    iifname "{POD_IFNAME}" {proto} dport {{ {", ".join(str(p) for p in sorted(set(nums)))} }} '
            f"dnat to {GUEST_IP}" for proto, nums in sorted(by_proto.items()))  # fmt: skip
    else:
        dnat = f'    iifname "{POD_IFNAME}" meta l4proto {{ tcp, udp, sctp }} dnat to {GUEST_IP}'
    source_nat = f"snat to {pod_ip}" if snat else "masquerade"
    return f"""table ip virtplane_masq {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
{dnat}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {GUEST_IP} oifname "{POD_IFNAME}" {source_nat}
  }}
}}
"""


def is_passt(iface: Mapping[str, Any]) -> bool:
    """KubeVirt's passt binding, either spelling: core `passtBinding: {}` or the plugin `binding: {name: passt}`."""
    binding = iface.get("binding")
    return "passtBinding" in iface or (isinstance(binding, Mapping) and binding.get("name") == "passt")


def interface_ports(iface: Mapping[str, Any]) -> list[tuple[str, int]]:
    out = []
    for p in iface.get("ports") or []:
        out.append((str(p.get("protocol") or "TCP"), int(p["port"])))
    return out


class PodNetwork:
    """One node's pod network: setup/teardown of a VMI's netns, CNI chain and masquerade binding."""

    def __init__(self, state_dir: Path, *, conf_file: Path | None = None, pod_cidr: str = "10.244.0.0/24",
                 cni_path: Sequence[Path] = cni.DEFAULT_CNI_PATH) -> None:  # fmt: skip
        self.state_dir = state_dir
        self.conf_file = conf_file
        self.pod_cidr = pod_cidr
        self.cni_path = tuple(cni_path)
        self._ips: dict[str, str] = {}
        self._sec_ips: dict[str, dict[str, str]] = {}
        # this node's tag in host-wide names: its state dir is its own
        self.node_tag = hashlib.sha256(str(state_dir).encode()).hexdigest()[:4]

    def netns_for(self, uid: str) -> str:
        return netns_name(uid, self.node_tag)

    def conflist(self) -> dict[str, Any]:
        """The node's chain. A config file is re-read for every pod, as a kubelet re-reads /etc/cni/net.d:
        an operator fixes a broken config without restarting the agent."""
        if self.conf_file is None:
            return cni.parse_config(default_conflist(self.pod_cidr, self.state_dir))
        try:
            raw = self.conf_file.read_text()
        except OSError as err:
            raise cni.CNIError(f"cannot read CNI config {self.conf_file}: {err.strerror}") from None
        return cni.parse_config(raw)

    def _state_file(self, uid: str) -> Path:
        return self.state_dir / "pods" / f"{uid}.json"

    def _save(self, uid: str, state: dict[str, Any]) -> None:
        f = self._state_file(uid)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(f)

    def pod_ip(self, uid: str) -> str | None:
        """The pod IP of a set-up VMI (cached: asked on every status write)."""
        if uid not in self._ips:
            try:
                ip = json.loads(self._state_file(uid).read_text()).get("podIP")
            except (OSError, ValueError):
                return None
            if not ip:
                return None
            self._ips[uid] = ip
        return self._ips[uid]

    async def setup(self, uid: str, ports: Sequence[tuple[str, int]] = (), dns_search: Sequence[str] = (), *,
                    binding: str = "masquerade", keep_ip: str | None = None,
                    container_id: str | None = None) -> PodAttachment:  # fmt: skip
        """Everything or nothing: on any failure what was done is undone (CNI DEL, netns removed). `binding`:
        masquerade (a tap fd for QEMU) or passt (a socket for QEMU).

        A live migration's target passes `keep_ip`, the VMI's pod IP on the source: the node's chain still
        runs (under `container_id`, so its IPAM never confuses this launcher with the VMI's first one) and
        gives eth0 this node's own *link address*; the kept IP is added beside it as a /32, is what the guest's
        traffic is SNATed to and what the pod reports. Nothing routes the kept IP here until activate()."""
        try:
            conflist = self.conflist()
        except cni.CNIError as err:
            raise PodNetworkError(f"pod network: {err}") from None
        ns = self.netns_for(uid)
        cid = container_id or uid
        inv = cni.Invocation(container_id=cid, netns=str(netns.path(ns)), ifname=POD_IFNAME)
        state: dict[str, Any] = {"uid": uid, "netns": ns, "conflist": conflist, "containerID": cid}
        # A leftover of an earlier attempt (agent killed mid-setup) is cleaned first: same uid, same names.
        await self.teardown(uid)
        self._save(uid, state)  # before anything exists, so a crash mid-setup can still be undone
        fd: int | None = None
        sock = ""
        try:
            await netns.add(ns)
            await netns.run_in(ns, ["ip", "link", "set", "lo", "up"])
            await _fix_bridge_macs(conflist)
            result = await cni.add(conflist, inv, self.cni_path)
            pod_ip = cni.result_ipv4(result, POD_IFNAME)
            if pod_ip is None:
                raise PodNetworkError(f"pod network: the CNI chain gave {POD_IFNAME} no IPv4 address")
            state["podIP"] = pod_ip
            state["result"] = result
            self._save(uid, state)
            if keep_ip and keep_ip != pod_ip and binding != "passt":
                ipaddress.IPv4Address(keep_ip)  # ValueError: refused below
                await netns.run_in(ns, ["ip", "addr", "add", f"{keep_ip}/32", "dev", POD_IFNAME])
                state["linkIP"], state["keptIP"] = pod_ip, keep_ip
                pod_ip = state["podIP"] = keep_ip
                self._save(uid, state)
            if binding == "passt":
                state["passtPid"], sock = await self._start_passt(ns, uid, ports)
                self._save(uid, state)
            else:
                state["dnsmasqPid"] = await self._masquerade(ns, uid, pod_ip, ports, dns_search,
                                                             snat="keptIP" in state)  # fmt: skip
                self._save(uid, state)
                fd = await asyncio.to_thread(netns.open_tap, ns, TAP)
        except (cni.CNIError, netns.NetnsError, PodNetworkError, OSError, ValueError) as err:
            if fd is not None:
                os.close(fd)
            await self.teardown(uid)
            msg = str(err)
            raise PodNetworkError(msg if msg.startswith("pod network") else f"pod network: {msg}") from None
        self._ips[uid] = pod_ip
        if binding == "passt":
            return PodAttachment(uid=uid, netns=ns, pod_ip=pod_ip, tap_fd=None, socket=sock)
        return PodAttachment(uid=uid, netns=ns, pod_ip=pod_ip, tap_fd=fd)

    def _passt_dir(self, uid: str) -> Path:
        node = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:12]
        return Path("/run/virtplane") / f"passt-{node}" / uid

    async def _start_passt(self, ns: str, uid: str, ports: Sequence[tuple[str, int]]) -> tuple[int, str]:
        """passt in the VMI's netns, listening on a unix socket for QEMU; it quits when QEMU disconnects (-1).
        passt detaches from the process we start (its sandboxing re-executes it) and drops to `nobody`, so its
        socket and pid file live in a directory `nobody` owns and can reach (under /run: a node's data dir may
        be closed to other users), and we learn its pid from that file."""
        d = self.state_dir / "pods" / uid
        d.mkdir(parents=True, exist_ok=True)
        run = self._passt_dir(uid)
        for parent in reversed(run.parents[:3]):  # /run/virtplane/<node>: traversable by `nobody`
            parent.mkdir(exist_ok=True)
            parent.chmod(0o755)
        run.mkdir(exist_ok=True)
        os.chown(run, *_NOBODY)
        sock, pidfile = run / "passt.sock", run / "passt.pid"
        sock.unlink(missing_ok=True)
        pidfile.unlink(missing_ok=True)
        forward: list[str] = []
        for flag, proto in (("-t", "tcp"), ("-u", "udp")):
            nums = sorted({p for pr, p in ports if pr.lower() == proto})
            # KubeVirt forwards every port when the interface lists none, and only the listed ones otherwise
            forward += [flag, ",".join(str(n) for n in nums) if nums else ("none" if ports else "all")]
        # passt relays the guest's pings through ICMP "ping sockets", which the netns must allow its user
        await netns.run_in(ns, ["sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647"])
        argv = netns.in_netns(ns, ["passt", "--foreground", "--quiet", "--one-off", "--socket", str(sock),
                                   "--pid", str(pidfile), "--log-file", str(d / "passt.log"), *forward])
        await asyncio.to_thread(_spawn, argv, d / "passt.stderr")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not (sock.exists() and pidfile.exists() and pidfile.read_text().strip()):
            if loop.time() > deadline:
                log_text = (d / "passt.log").read_text(errors="replace") if (d / "passt.log").exists() else ""
                errs = [ln.split("ERROR:", 1)[1].strip() for ln in log_text.splitlines() if "ERROR:" in ln]
                raise PodNetworkError("pod network: passt did not start: "
                                      f"{'; '.join(errs) or 'no socket within 10 s, see ' + str(d / 'passt.log')}")
            await asyncio.sleep(0.02)
        return int(pidfile.read_text().strip()), str(sock)

    async def _masquerade(self, ns: str, uid: str, pod_ip: str, ports: Sequence[tuple[str, int]],
                          dns_search: Sequence[str], *, snat: bool = False) -> int:  # fmt: skip
        sh = netns.run_in
        await sh(ns, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        await sh(ns, ["ip", "link", "add", BRIDGE, "type", "bridge"])
        await sh(ns, ["ip", "addr", "add", f"{GATEWAY}/{PREFIX}", "dev", BRIDGE])
        await sh(ns, ["ip", "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"])
        await sh(ns, ["ip", "link", "set", TAP, "master", BRIDGE, "up"])
        await sh(ns, ["ip", "link", "set", BRIDGE, "up"])
        await sh(ns, ["nft", "-f", "-"], stdin=nft_rules(pod_ip, ports, snat=snat).encode())
        return await self._start_dnsmasq(ns, uid, dns_search)

    def dns_dir(self) -> Path:
        """hosts files with the cluster's names (virtplane.network.services writes them); every VMI's dnsmasq
        reads them through --hostsdir and notices changes by itself."""
        d = self.state_dir / "dns"
        d.mkdir(parents=True, exist_ok=True)
        return d

    async def _start_dnsmasq(self, ns: str, uid: str, dns_search: Sequence[str]) -> int:
        """DHCP for the guest's fixed address, and its DNS server (the gateway, as KubeVirt's masquerade binding
        hands out the pod's resolv.conf): cluster names from the node's hosts files, the cluster domain
        answered locally (NXDOMAIN, never forwarded), anything else to the host's upstream resolvers."""
        d = self.state_dir / "pods" / uid
        d.mkdir(parents=True, exist_ok=True)
        dns = [f"--hostsdir={self.dns_dir()}", "--no-hosts", "--no-resolv", "--domain-needed"]
        dns += [f"--server={s}" for s in upstream_resolvers()]
        if dns_search:
            dns += [f"--local=/{dns_search[-1]}/", f"--dhcp-option=option:domain-name,{dns_search[0]}",
                    f"--dhcp-option=option:domain-search,{','.join(dns_search)}"]  # fmt: skip
        argv = netns.in_netns(ns, [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--user=root", "--port=53",
            f"--interface={BRIDGE}", "--bind-interfaces", "--except-interface=lo",
            f"--dhcp-range={GUEST_IP},{GUEST_IP},255.255.255.0,infinite", f"--dhcp-option=option:router,{GATEWAY}",
            f"--dhcp-option=option:dns-server,{GATEWAY}", *dns,
            "--dhcp-authoritative", f"--dhcp-leasefile={d / 'leases'}", f"--log-facility={d / 'dnsmasq.log'}",
            "--log-dhcp",
        ])  # fmt: skip
        proc = await asyncio.to_thread(_spawn, argv, d / "dnsmasq.stderr")
        await asyncio.sleep(0.2)
        if proc.poll() is not None:
            err = (d / "dnsmasq.stderr").read_text(errors="replace").strip()
            raise PodNetworkError(f"pod network: dnsmasq exited ({proc.returncode}): {err}")
        return proc.pid

    async def attach_secondary(self, uid: str, ifname: str, conflist: dict[str, Any], *,
                               guest_mac: str | None = None) -> tuple[int, str | None]:  # fmt: skip
        """A Multus-style secondary network with KubeVirt's bridge binding, in the VMI's netns (set up before):
        the NAD's CNI chain ADDed as `ifname`, then a bridge `k6t-<ifname>` joining that interface and a tap
        for QEMU. The address the NAD's IPAM gave moves from the pod interface to the guest, by DHCP from a
        dnsmasq on that bridge (the bridge itself only has a link-local address, as KubeVirt's has).
        Returns (tap fd, the guest's address or None when the NAD has no IPAM). The caller tears the whole
        VMI network down on failure (teardown() also undoes what got this far)."""
        self._sec_ips.pop(uid, None)
        state = json.loads(self._state_file(uid).read_text())
        ns = state["netns"]
        entry: dict[str, Any] = {"ifname": ifname, "conflist": conflist}
        state.setdefault("secondaries", []).append(entry)
        self._save(uid, state)  # before ADD: a crash in between is still DELeted
        inv = cni.Invocation(container_id=uid, netns=str(netns.path(ns)), ifname=ifname)
        result = await cni.add(conflist, inv, self.cni_path)
        entry["result"] = result
        self._save(uid, state)
        cidr = result_ipv4_cidr(result, ifname)
        bridge, tap = f"k6t-{ifname}", f"tap-{ifname}"
        sh = netns.run_in
        await sh(ns, ["ip", "addr", "flush", "dev", ifname])
        await sh(ns, ["ip", "link", "add", bridge, "type", "bridge"])
        await sh(ns, ["ip", "addr", "add", "169.254.75.10/32", "dev", bridge])
        await sh(ns, ["ip", "link", "set", ifname, "master", bridge, "up"])
        await sh(ns, ["ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"])
        await sh(ns, ["ip", "link", "set", tap, "master", bridge, "up"])
        await sh(ns, ["ip", "link", "set", bridge, "up"])
        if cidr is not None:
            iface = ipaddress.ip_interface(cidr)
            d = self.state_dir / "pods" / uid
            d.mkdir(parents=True, exist_ok=True)
            # --shared-network: dnsmasq serves a subnet its interface has no address in (only one would be
            # taken from the NAD's range otherwise); no router: the pod network keeps the default route.
            argv = netns.in_netns(ns, [
                "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--user=root", "--port=0",
                f"--interface={bridge}", "--bind-interfaces", "--except-interface=lo",
                f"--shared-network={bridge},{iface.ip}",
                f"--dhcp-range={iface.ip},{iface.ip},{iface.netmask},infinite", "--dhcp-authoritative",
                # Only this VMI's NIC: the NAD's bridge carries every VMI's DHCP broadcasts, and another VMI's
                # dnsmasq answering first would hand a guest its neighbour's address.
                *([f"--dhcp-host={guest_mac},{iface.ip}", "--dhcp-ignore=tag:!known"] if guest_mac else []),
                f"--dhcp-leasefile={d / f'leases-{ifname}'}", f"--log-facility={d / f'dnsmasq-{ifname}.log'}",
                "--log-dhcp", f"--pid-file={d / f'dnsmasq-{ifname}.pid'}",
            ])  # fmt: skip
            proc = await asyncio.to_thread(_spawn, argv, d / f"dnsmasq-{ifname}.stderr")
            entry["dnsmasqPid"] = proc.pid
            self._save(uid, state)
            await asyncio.sleep(0.2)
            if proc.poll() is not None:
                err = (d / f"dnsmasq-{ifname}.stderr").read_text(errors="replace").strip()
                raise PodNetworkError(f"dnsmasq for {ifname} exited ({proc.returncode}): {err}")
        fd = await asyncio.to_thread(netns.open_tap, ns, tap)
        return fd, str(ipaddress.ip_interface(cidr).ip) if cidr else None

    def secondary_ips(self, uid: str) -> dict[str, str]:
        """Pod ifname (net1, ...) → the address its guest NIC gets by DHCP (cached: asked on status writes)."""
        if uid not in self._sec_ips:
            try:
                state = json.loads(self._state_file(uid).read_text())
            except (OSError, ValueError):
                return {}
            out = {}
            for sec in state.get("secondaries") or []:
                cidr = result_ipv4_cidr(sec.get("result") or {}, sec.get("ifname", ""))
                if cidr:
                    out[sec["ifname"]] = cidr.split("/")[0]
            self._sec_ips[uid] = out
        return self._sec_ips[uid]

    async def detach_secondary(self, uid: str, ifname: str) -> list[str]:
        """Undo attach_secondary for one interface (its NIC unplugged): dnsmasq stopped, tap and bridge removed,
        CNI DEL (releases the NAD address). Idempotent; returns the errors."""
        self._sec_ips.pop(uid, None)
        try:
            state = json.loads(self._state_file(uid).read_text())
        except (OSError, ValueError):
            return []
        ns = state.get("netns") or self.netns_for(uid)
        keep, errors = [], []
        for sec in state.get("secondaries") or []:
            if sec.get("ifname") != ifname:
                keep.append(sec)
                continue
            if sec.get("dnsmasqPid"):
                await asyncio.to_thread(_stop_pid, int(sec["dnsmasqPid"]))
            if netns.exists(ns):
                for link in (f"tap-{ifname}", f"k6t-{ifname}"):
                    await netns.run_in(ns, ["ip", "link", "delete", link], check=False)
            inv = cni.Invocation(container_id=uid, netns=str(netns.path(ns)) if netns.exists(ns) else "",
                                 ifname=ifname)  # fmt: skip
            errors += await cni.delete(sec["conflist"], inv, self.cni_path, sec.get("result"), quiet=True)
        state["secondaries"] = keep
        self._save(uid, state)
        return errors

    async def activate(self, uid: str) -> None:
        """A migration target that took the guest over: the kept IP is routed to this launcher's link address
        on this node (`ip route replace IP/32 via LINK`), so the node and its pods reach it here. Other nodes
        learn where it went from the launcher pod (virtplane.node.routes). A no-op without a kept IP."""
        try:
            state = json.loads(self._state_file(uid).read_text())
        except (OSError, ValueError):
            return
        if not state.get("keptIP") or state.get("routed"):
            return
        await netns.run(["ip", "route", "replace", f"{state['keptIP']}/32", "via", state["linkIP"],
                         "proto", ROUTE_PROTO])  # fmt: skip
        state["routed"] = True
        self._save(uid, state)

    def _kept_file(self, uid: str) -> Path:
        return self.state_dir / "kept" / f"{uid}.json"

    def kept(self) -> list[dict[str, Any]]:
        """The addresses this node allocated to VMIs that migrated away (released by release_kept())."""
        out = []
        for f in sorted((self.state_dir / "kept").glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                out.append(json.loads(f.read_text()))
        return out

    async def release_kept(self, uid: str) -> list[str]:
        """The VMI is gone (or runs here again and is being torn down): its first address goes back to this
        node's IPAM. Idempotent; returns the errors."""
        f = self._kept_file(uid)
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            return []
        inv = cni.Invocation(container_id=rec.get("containerID") or uid, netns="", ifname=POD_IFNAME)
        errors = await cni.ipam_delete(rec["conflist"], inv, self.cni_path)
        if not errors:
            f.unlink(missing_ok=True)
            log.info("released the kept pod IP %s of VMI %s", rec.get("ip"), uid)
        return errors

    async def teardown(self, uid: str, *, keep_ip: bool = False, owner: Mapping[str, str] | None = None,
                       release: bool = False) -> list[str]:  # fmt: skip
        """Stop dnsmasq, CNI DEL (releases the IP), remove the netns. Idempotent; returns the errors.

        `keep_ip`: the guest lives on elsewhere (a completed live migration) with this launcher's pod IP, so
        when this launcher holds the VMI's own allocation the chain is DELeted without its IPAM and the address
        is recorded as kept (`owner`: namespace and name of the VMI, for release_kept's caller); a target's
        link address is released as usual (the kept IP stays with the node that allocated it).
        `release`: the VMI itself ends here (deleted), so an address this node kept for it is released
        too; a dropped migration target must not, the guest still uses it elsewhere."""
        self._ips.pop(uid, None)
        self._sec_ips.pop(uid, None)
        f = self._state_file(uid)
        try:
            state = json.loads(f.read_text())
        except (OSError, ValueError):
            return await self.release_kept(uid) if release else []
        errors: list[str] = []
        ns = state.get("netns") or self.netns_for(uid)
        cid = state.get("containerID") or uid
        if state.get("routed"):
            await netns.run(["ip", "route", "del", f"{state['keptIP']}/32", "via", state["linkIP"]], check=False)
        keep = keep_ip and not state.get("keptIP") and bool(state.get("podIP"))
        for sec in reversed(state.get("secondaries") or []):  # secondary networks first, last added first
            if sec.get("dnsmasqPid"):
                await asyncio.to_thread(_stop_pid, int(sec["dnsmasqPid"]))
            inv = cni.Invocation(container_id=uid, netns=str(netns.path(ns)) if netns.exists(ns) else "",
                                 ifname=sec["ifname"])  # fmt: skip
            errors += await cni.delete(sec["conflist"], inv, self.cni_path, sec.get("result"), quiet=True)
        for key in ("dnsmasqPid", "passtPid"):
            if state.get(key):
                await asyncio.to_thread(_stop_pid, int(state[key]))
        conflist = state.get("conflist")
        if conflist:
            inv = cni.Invocation(container_id=cid, netns=str(netns.path(ns)) if netns.exists(ns) else "",
                                 ifname=POD_IFNAME)  # fmt: skip
            if keep:
                kf = self._kept_file(uid)
                kf.parent.mkdir(parents=True, exist_ok=True)
                kf.write_text(json.dumps({"uid": uid, "ip": state["podIP"], "containerID": cid, "conflist": conflist,
                                          **dict(owner or {})}))  # fmt: skip
                errors += await cni.delete(cni.without_ipam(conflist), inv, self.cni_path, state.get("result"),
                                           quiet=True)  # fmt: skip
            else:
                errors += await cni.delete(conflist, inv, self.cni_path, state.get("result"), quiet=True)
        if release:
            errors += await self.release_kept(uid)
        await netns.delete(ns)
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
        shutil.rmtree(self.state_dir / "pods" / uid, ignore_errors=True)  # leases, logs
        shutil.rmtree(self._passt_dir(uid), ignore_errors=True)
        for e in errors:
            log.warning("pod network teardown of %s: %s", uid, e)
        return errors


async def _fix_bridge_macs(conflist: Mapping[str, Any]) -> None:
    """A Linux bridge whose last port left has the all-zero MAC; the bridge plugin (1.1.x) copies the bridge's
    MAC back onto it when it adds the gateway address and fails with EINVAL ("could not set bridge's mac"), so
    the first pod after the node's last pod went away (or after a failed ADD) could never start. Pin such a
    bridge to a stable locally administered MAC derived from its name."""
    for plugin in conflist.get("plugins") or []:
        if plugin.get("type") != "bridge":
            continue
        name = str(plugin.get("bridge") or "cni0")
        # Asked through netlink, not sysfs: /sys shows the netns it was mounted in, and a node agent may run
        # in a netns of its own (`up --node-netns`). Missing: the plugin creates the bridge (proper MAC).
        out = await netns.run(["ip", "-j", "link", "show", "dev", name], check=False)
        try:
            address = (json.loads(out or "[]") or [{}])[0].get("address")
        except ValueError:
            address = None
        if address == "00:00:00:00:00:00":
            digest = hashlib.sha256(name.encode()).digest()
            pinned = ":".join(f"{b:02x}" for b in (0x0A, 0x58, *digest[:4]))
            await netns.run(["ip", "link", "set", name, "address", pinned])


def result_ipv4_cidr(result: Mapping[str, Any], ifname: str) -> str | None:
    """The first IPv4 address with its prefix ("192.168.1.5/24") on `ifname` in a CNI ADD result."""
    ifaces = result.get("interfaces") or []
    for ip in result.get("ips") or []:
        addr = str(ip.get("address", ""))
        if not addr or ":" in addr:
            continue
        idx = ip.get("interface")
        if idx is None or (isinstance(idx, int) and idx < len(ifaces) and ifaces[idx].get("name") == ifname):
            return addr
    return None


def upstream_resolvers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    """The host's nameservers a pod netns can reach: loopback ones (systemd-resolved's 127.0.0.53) are the
    host's own and unreachable from another netns, so they are left out."""
    out = []
    try:
        text = resolv_conf.read_text()
    except OSError:
        return []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                addr = ipaddress.ip_address(parts[1].split("%")[0])
            except ValueError:
                continue
            if not addr.is_loopback:
                out.append(str(addr))
    return out


def _spawn(argv: Sequence[str], stderr: Path) -> subprocess.Popen[bytes]:
    # Its own session: it must outlive an agent restart, like QEMU (teardown stops it by pid).
    with open(stderr, "ab") as err:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )


# passt drops to this user (it refuses to keep root); what it writes after that must be writable by it.
_NOBODY = (65534, 65534)


def _stop_pid(pid: int) -> None:
    """dnsmasq or passt we started (its pid from our state file): SIGTERM, reaped if it is our child."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"dnsmasq" not in cmdline and b"passt" not in cmdline:
        return  # the pid was reused by something else: not ours to stop
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
