"""Several nodes on one machine: a network namespace per node agent, joined by a bridge the cluster creates.

`virtplane up --nodes N --node-netns` gives each node agent (and so every QEMU it starts) its own namespace
with one veth into the cluster bridge and its own address, so traffic between nodes — the API server
proxying to an agent, a live migration stream — really crosses a network instead of loopback.

Everything host-global is named after a short hash of the cluster's data directory, so clusters running side
by side (parallel test runs) never share a bridge, a namespace or a subnet, and a cluster that was killed
can be cleaned up by whoever knows its data directory (`ClusterNetwork.for_data_dir(...).teardown()`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import os
from pathlib import Path

from . import netns

# 10.224.0.0/12 minus nothing in particular: private, and away from the pod CIDR default (10.244.0.0/24) and
# the masquerade network (10.0.2.0/24). A /24 per cluster, picked from the data dir hash, moved on if taken.
POOL = ipaddress.ip_network("10.224.0.0/12")
FIRST_NODE_HOST = 10


class NodeNetError(Exception):
    pass


def _link_exists(name: str) -> bool:
    # a sysfs stat: no I/O worth a thread
    return os.path.exists(f"/sys/class/net/{name}")


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterNetwork:
    tag: str  # 6 hex digits from the data dir
    subnet: ipaddress.IPv4Network

    @classmethod
    def for_data_dir(cls, data_dir: Path, subnet: ipaddress.IPv4Network | None = None) -> ClusterNetwork:
        tag = hashlib.sha256(str(data_dir.expanduser().resolve()).encode()).hexdigest()[:6]
        if subnet is None:
            saved = data_dir / "nodenet.json"
            if saved.exists():
                subnet = ipaddress.ip_network(json.loads(saved.read_text())["subnet"])  # type: ignore[assignment]
            else:
                index = int(tag, 16) % (POOL.num_addresses // 256)
                subnet = list(POOL.subnets(new_prefix=24))[index]
        assert isinstance(subnet, ipaddress.IPv4Network)
        return cls(tag, subnet)

    @property
    def bridge(self) -> str:
        return f"vpbr{self.tag}"

    @property
    def gateway(self) -> str:
        """The host's address on the bridge: where node agents reach the API server and registries."""
        return str(self.subnet.network_address + 1)

    def namespace(self, index: int) -> str:
        return f"virtplane-{self.tag}-node-{index}"

    def veth(self, index: int) -> str:
        return f"vpv{self.tag}n{index}"  # the host end; at most 15 characters for index < 1000

    def address(self, index: int) -> str:
        return str(self.subnet.network_address + FIRST_NODE_HOST + index)

    def save(self, data_dir: Path) -> None:
        (data_dir / "nodenet.json").write_text(json.dumps({"tag": self.tag, "subnet": str(self.subnet),
                                                           "bridge": self.bridge, "gateway": self.gateway}))

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def _subnet_in_use(self) -> bool:
        out = await netns.run(["ip", "-4", "-j", "route", "show"], check=False)
        try:
            routes = json.loads(out or "[]")
        except ValueError:
            return False
        for r in routes:
            dst = r.get("dst", "")
            if dst in ("", "default") or r.get("dev") == self.bridge:
                continue
            try:
                if ipaddress.ip_network(dst, strict=False).overlaps(self.subnet):
                    return True
            except ValueError:
                continue
        return False

    async def setup_bridge(self) -> ClusterNetwork:
        """Create the bridge (idempotent); returns the network actually used (another subnet when ours is
        taken by some other interface on this machine)."""
        net = self
        for _ in range(16):
            if not await net._subnet_in_use():
                break
            nxt = net.subnet.network_address + 256
            if nxt not in POOL:
                nxt = POOL.network_address
            net = ClusterNetwork(net.tag, ipaddress.ip_network(f"{nxt}/24"))  # type: ignore[arg-type]
        else:
            raise NodeNetError("no free /24 in 10.224.0.0/12 for the cluster bridge")
        if not _link_exists(net.bridge):
            await netns.run(["ip", "link", "add", net.bridge, "type", "bridge"])
        await netns.run(["ip", "addr", "replace", f"{net.gateway}/{net.subnet.prefixlen}", "dev", net.bridge])
        await netns.run(["ip", "link", "set", net.bridge, "up"])
        return net

    async def add_node(self, index: int) -> tuple[str, str]:
        """The node's namespace, veth pair and address (idempotent); returns (namespace, address)."""
        ns, veth, addr = self.namespace(index), self.veth(index), self.address(index)
        if not netns.exists(ns):
            await netns.add(ns)
        if not _link_exists(veth):
            await netns.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        await netns.run(["ip", "link", "set", veth, "master", self.bridge, "up"])
        await netns.run_in(ns, ["ip", "link", "set", "lo", "up"])
        await netns.run_in(ns, ["ip", "addr", "replace", f"{addr}/{self.subnet.prefixlen}", "dev", "eth0"])
        await netns.run_in(ns, ["ip", "link", "set", "eth0", "up"])
        # a default route via the host, so a node reaches what the host reaches (as a real node would)
        await netns.run_in(ns, ["ip", "route", "replace", "default", "via", self.gateway])
        return ns, addr

    async def teardown(self, max_nodes: int = 64) -> None:
        """Remove the namespaces, veths and the bridge (idempotent; safe on a half-built network)."""
        for i in range(max_nodes + 1):
            veth = self.veth(i)
            if _link_exists(veth):
                await netns.run(["ip", "link", "delete", veth], check=False)
            await netns.delete(self.namespace(i))
        if _link_exists(self.bridge):
            await netns.run(["ip", "link", "delete", self.bridge], check=False)
