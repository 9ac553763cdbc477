"""Routes to the other nodes' pod subnets (what flannel's host-gw or kube-router do): for every other Node
with `spec.podCIDR` and an InternalIP on a network this node is directly attached to, `ip route replace
<podCIDR> via <InternalIP>` in the agent's netns. So a VM reaches a VM on another node by pod IP, and a
Service endpoint on another node is reachable after this node's DNAT.

Only routes this agent added are ever replaced or removed (a route whose gateway is not directly reachable,
e.g. every node on 127.0.0.1 in one netns, is refused by the kernel and skipped)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from typing import Any

from virtplane.client import informer, rest
from virtplane.network import netns

log = logging.getLogger(__name__)
JSON = dict[str, Any]
NODES = rest.GVR("", "v1", "nodes", namespaced=False)
RETRY_SECONDS = 5.0


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


class NodeRoutes:
    def __init__(self, client: rest.Client, node_name: str, own_cidr: str | None) -> None:
        self.node_name = node_name
        self.own_cidr = own_cidr
        self.nodes = informer.Informer(client, NODES)
        self.installed: dict[str, str] = {}
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.nodes.add_handler(lambda *_: self._dirty.set())

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
        self._dirty.set()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if not await self.sync(wanted_routes(self.nodes.list(), self.node_name, self.own_cidr)):
                await asyncio.sleep(RETRY_SECONDS)
                self._dirty.set()

    async def sync(self, want: dict[str, str]) -> bool:
        ok = True
        for cidr in [c for c in self.installed if c not in want]:
            await netns.run(["ip", "route", "del", cidr, "via", self.installed.pop(cidr)], check=False)
        for cidr, via in want.items():
            if self.installed.get(cidr) == via:
                continue
            try:
                await netns.run(["ip", "route", "replace", cidr, "via", via])
            except netns.NetnsError as err:
                # e.g. "Nexthop has invalid gateway": that node is not on a network we are attached to
                log.info("no route to pod subnet %s via %s: %s", cidr, via, err)
                ok = "invalid gateway" in str(err) or "unreachable" in str(err).lower()
                continue
            self.installed[cidr] = via
            log.info("route to pod subnet %s via %s", cidr, via)
        return ok
