"""Routes to the other nodes' pod subnets (what flannel's host-gw or kube-router do): for every other Node
with `spec.podCIDR` and an InternalIP on a network this node is directly attached to, `ip route replace
<podCIDR> via <InternalIP>` in the agent's netns. So a VM reaches a VM on another node by pod IP, and a
Service endpoint on another node is reachable after this node's DNAT.

Pod IPs that moved: a live-migrated VMI keeps its pod IP, which then lives outside the pod subnet of the node
running it. Every launcher pod that runs (phase Running) with a pod IP from another node's subnet is announced
as a /32 route to the node it runs on (`ip route replace IP/32 via <InternalIP> proto 98`), on every node but
that one (its own agent routes the IP to the launcher's netns, virtplane.network.pod.PodNetwork.activate).
When two launchers claim one IP (the moment a migration completes) the newer pod wins. The node whose subnet
the IP came from also answers ARP for it on its pod bridge (a proxy neighbour entry) and announces that with a
gratuitous ARP, since its local pods reach their own subnet without a router. The switch happens when the
target's launcher pod turns Running with the IP, which the target's agent writes right after the guest runs
there.

Only routes this agent added are ever replaced or removed (a route whose gateway is not directly reachable,
e.g. every node on 127.0.0.1 in one netns, is refused by the kernel and skipped)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import struct
from typing import Any

from virtplane.client import informer, rest
from virtplane.network import netns

log = logging.getLogger(__name__)
JSON = dict[str, Any]
NODES = rest.GVR("", "v1", "nodes", namespaced=False)
RETRY_SECONDS = 5.0
MOVED_PROTO = "98"  # `ip route ... proto 98`: a moved pod IP's /32, found again after an agent restart


def internal_ip(node: JSON) -> str | None:
    for a in (node.get("status") or {}).get("addresses") or []:
        if a.get("type") == "InternalIP":
            return str(a.get("address"))
    return None


def wanted_routes(nodes: list[JSON], me: str, own_cidr: str | None) -> dict[str, str]:
    """pod CIDR → gateway (the node's InternalIP) for every other node that has both."""
    out: dict[str, str] = {}
    for n in nodes:
        if n["metadata"]["name"] == me:
            continue
        cidr, ip = (n.get("spec") or {}).get("podCIDR"), internal_ip(n)
        if not cidr or not ip or cidr == own_cidr:
            continue
        try:
            net = ipaddress.ip_network(cidr, strict=True)
            ipaddress.ip_address(ip)
        except ValueError:
            continue
        if isinstance(net, ipaddress.IPv4Network) and not ipaddress.ip_address(ip).is_loopback:
            out[str(net)] = ip
    return out


def moved_ips(nodes: list[JSON], pods: list[JSON]) -> dict[str, str]:
    """Pod IP → the node running it, for every pod IP that runs outside the pod subnet it belongs to (a
    live-migrated VMI's). Among Running pods claiming one IP the newest wins; an IP whose winner runs on the
    IP's own node is not listed (it is home again)."""
    cidrs: dict[str, ipaddress.IPv4Network] = {}
    for n in nodes:
        with contextlib.suppress(ValueError, TypeError):
            net = ipaddress.ip_network((n.get("spec") or {}).get("podCIDR") or "", strict=True)
            if isinstance(net, ipaddress.IPv4Network):
                cidrs[n["metadata"]["name"]] = net
    best: dict[str, tuple[str, str, str]] = {}  # ip → (creationTimestamp, pod name, node)
    for p in pods:
        s, spec = p.get("status") or {}, p.get("spec") or {}
        ip, node = s.get("podIP"), spec.get("nodeName")
        if s.get("phase") != "Running" or not ip or not node or ip == s.get("hostIP"):
            continue
        rank = (str(p["metadata"].get("creationTimestamp") or ""), str(p["metadata"].get("name") or ""), node)
        if ip not in best or rank > best[ip]:
            best[ip] = rank
    out: dict[str, str] = {}
    for ip, (_ts, _name, node) in best.items():
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError:
            continue
        home = next((name for name, net in cidrs.items() if addr in net), None)
        if home is not None and home != node:
            out[ip] = node
    return out


def gratuitous_arp(dev: str, ip: str) -> None:
    """Announce on `dev` that `ip` is at `dev`'s MAC (an ARP request for itself, RFC 5227's announcement):
    neighbours holding an entry for it update it. Blocking; best effort."""
    # the MAC from the bound socket, not sysfs: /sys shows the netns it was mounted in, and this agent may
    # run in a netns of its own
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806)) as s:
        s.bind((dev, 0x0806))
        mac = s.getsockname()[4][:6]
        addr = socket.inet_aton(ip)
        arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, addr, b"\0" * 6, addr)
        s.send(b"\xff" * 6 + mac + b"\x08\x06" + arp)


class NodeRoutes:
    def __init__(self, client: rest.Client, node_name: str, own_cidr: str | None,
                 pods: informer.Informer | None = None) -> None:  # fmt: skip
        self.node_name = node_name
        self.own_cidr = own_cidr
        self.nodes = informer.Informer(client, NODES)
        self.pods = pods  # launcher pods of every node (the agent's informer; started by the agent)
        self.installed: dict[str, str] = {}
        self.proxied: dict[str, str] = {}  # moved IP of our subnet → the pod bridge we answer ARP for it on
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.nodes.add_handler(lambda *_: self._dirty.set())
        if pods is not None:
            pods.add_handler(lambda *_: self._dirty.set())

    def start(self) -> None:
        self.nodes.start()
        self._task = asyncio.create_task(self._run(), name="node-routes")

    async def stop(self) -> None:
        # Routes stay: they belong to the node's netns, and VMs that keep running across an agent restart
        # keep needing them.
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        await self.nodes.stop()

    async def _run(self) -> None:
        await self.nodes.synced.wait()
        if self.pods is not None:
            await self.pods.synced.wait()
        await self._adopt()
        self._dirty.set()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            want = wanted_routes(self.nodes.list(), self.node_name, self.own_cidr)
            if self.pods is not None:
                want.update(self.moved_routes())
            if not await self.sync(want):
                await asyncio.sleep(RETRY_SECONDS)
                self._dirty.set()

    def moved_routes(self) -> dict[str, str]:
        assert self.pods is not None
        nodes = {n["metadata"]["name"]: n for n in self.nodes.list()}
        out = {}
        for ip, node in moved_ips(list(nodes.values()), self.pods.list()).items():
            via = internal_ip(nodes[node]) if node in nodes else None
            if node != self.node_name and via:
                out[f"{ip}/32"] = via
        return out

    async def _adopt(self) -> None:
        """/32s and proxy entries a previous agent added: ours to keep or remove."""
        out = await netns.run(["ip", "-4", "-j", "route", "show", "proto", MOVED_PROTO], check=False)
        with contextlib.suppress(ValueError):
            for r in json.loads(out or "[]"):
                if r.get("gateway") and "/" not in str(r.get("dst")):
                    self.installed[f"{r['dst']}/32"] = r["gateway"]
        out = await netns.run(["ip", "-4", "-j", "neigh", "show", "proxy"], check=False)
        with contextlib.suppress(ValueError):
            own = ipaddress.ip_network(self.own_cidr) if self.own_cidr else None
            for n in json.loads(out or "[]"):
                if own is not None and n.get("dst") and n.get("dev") and ipaddress.ip_address(n["dst"]) in own:
                    self.proxied[n["dst"]] = n["dev"]

    async def _pod_device(self) -> str | None:
        """The device of this node's own pod subnet (the CNI bridge), where local pods ARP."""
        if not self.own_cidr:
            return None
        out = await netns.run(["ip", "-4", "-j", "route", "show", "exact", self.own_cidr], check=False)
        with contextlib.suppress(ValueError, IndexError, KeyError):
            return str(json.loads(out or "[]")[0]["dev"])
        return None

    async def sync(self, want: dict[str, str]) -> bool:
        ok = True
        for cidr in [c for c in self.installed if c not in want]:
            await netns.run(["ip", "route", "del", cidr, "via", self.installed.pop(cidr)], check=False)
        for cidr, via in want.items():
            if self.installed.get(cidr) == via:
                continue
            host = cidr.endswith("/32")
            try:
                await netns.run(["ip", "route", "replace", cidr, "via", via, *(("proto", MOVED_PROTO) if host else ())])
            except netns.NetnsError as err:
                # e.g. "Nexthop has invalid gateway": that node is not on a network we are attached to
                log.info("no route to pod subnet %s via %s: %s", cidr, via, err)
                ok = "invalid gateway" in str(err) or "unreachable" in str(err).lower()
                continue
            self.installed[cidr] = via
            log.info("route to %s %s via %s", "moved pod IP" if host else "pod subnet", cidr, via)
        await self._sync_proxies({c[:-3] for c in want if c.endswith("/32")})
        return ok

    async def _sync_proxies(self, moved: set[str]) -> None:
        """Answer ARP for our subnet's moved IPs on our pod bridge, and only for those."""
        own = ipaddress.ip_network(self.own_cidr) if self.own_cidr else None
        mine = {ip for ip in moved if own is not None and ipaddress.ip_address(ip) in own}
        for ip in [i for i in self.proxied if i not in mine]:
            await netns.run(["ip", "neigh", "del", "proxy", ip, "dev", self.proxied.pop(ip)], check=False)
        missing = [ip for ip in mine if ip not in self.proxied]
        dev = await self._pod_device() if missing else None
        if dev is None:
            return
        for ip in missing:
            try:
                await netns.run(["ip", "neigh", "replace", "proxy", ip, "dev", dev])
            except netns.NetnsError as err:
                log.warning("cannot answer ARP for moved pod IP %s on %s: %s", ip, dev, err)
                continue
            self.proxied[ip] = dev
            try:
                await asyncio.to_thread(gratuitous_arp, dev, ip)
            except OSError as err:
                log.info("gratuitous ARP for %s on %s: %s", ip, dev, err)
