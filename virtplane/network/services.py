"""Service traffic on a node, as kube-proxy's nftables mode does it, and the names cluster DNS answers.

One nftables table per node agent (its name derived from the agent's state dir, so agents sharing a host
never touch each other's rules), replaced atomically on every change:
- a ClusterIP:port (from anywhere the node routes: its pods' netns, the node itself) and a NodePort on any
  local address are DNATed to one of the Service's ready endpoints, picked at random (`numgen`, one chain
  per endpoint, as kube-proxy's nftables mode);
- what was DNATed is masqueraded on the way out. Without it a pod reaching a Service whose endpoint sits on
  the same bridge would get the reply straight from the endpoint (L2, not back through this node's
  conntrack) and drop it; kube-proxy relies on br_netfilter there, which a host may not have;
- a ClusterIP:port or NodePort with no ready endpoint is rejected (ICMP port unreachable: the client's
  connect fails at once with "connection refused") in filter chains on input, forward and output.

Cluster DNS: `<service>.<namespace>.svc.<domain>` → the ClusterIP (a headless Service: its endpoints' IPs),
written as a hosts file that every VMI's dnsmasq reads through `--hostsdir` (re-read on change by inotify).
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from . import netns

JSON = dict[str, Any]
MASQ_MARK = 0x4000
DEFAULT_DOMAIN = "cluster.local"


def table_name(state_dir: Path) -> str:
    return "virtplane_svc_" + hashlib.sha256(str(state_dir).encode()).hexdigest()[:8]


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    """One service port: where it is reached and the endpoints (ip, port) it is spread over."""

    cluster_ip: str | None
    port: int
    protocol: str  # tcp | udp | sctp
    node_port: int | None
    endpoints: tuple[tuple[str, int], ...]


def _ready(ep: Mapping[str, Any]) -> bool:
    return (ep.get("conditions") or {}).get("ready") is not False


def rules(services: Iterable[JSON], slices: Iterable[JSON]) -> list[Rule]:
    """Service ports joined with their EndpointSlices' ready endpoints (ports matched by name, as kube-proxy)."""
    by_svc: dict[tuple[str, str], list[JSON]] = {}
    for s in slices:
        meta = s.get("metadata") or {}
        svc = (meta.get("labels") or {}).get("kubernetes.io/service-name")
        if svc and s.get("addressType", "IPv4") == "IPv4":
            by_svc.setdefault((meta.get("namespace", ""), svc), []).append(s)
    out: list[Rule] = []
    for svc in sorted(services, key=lambda s: (s["metadata"].get("namespace", ""), s["metadata"]["name"])):
        spec = svc.get("spec") or {}
        ip = spec.get("clusterIP")
        if spec.get("type") == "ExternalName" or not ip or ip == "None":
            continue
        key = (svc["metadata"].get("namespace", ""), svc["metadata"]["name"])
        for sp in spec.get("ports") or []:
            name = sp.get("name") or ""
            eps: set[tuple[str, int]] = set()
            for s in by_svc.get(key, []):
                port = next((p.get("port") for p in s.get("ports") or [] if (p.get("name") or "") == name
                             and (p.get("protocol") or "TCP") == (sp.get("protocol") or "TCP")), None)  # fmt: skip
                if port is None:
                    continue
                for ep in s.get("endpoints") or []:
                    if _ready(ep):
                        eps.update((a, int(port)) for a in ep.get("addresses") or [] if _is_v4(a))
            node_port = sp.get("nodePort") if spec.get("type") in ("NodePort", "LoadBalancer") else None
            out.append(Rule(cluster_ip=ip, port=int(sp["port"]), protocol=str(sp.get("protocol") or "TCP").lower(),
                            node_port=int(node_port) if node_port else None, endpoints=tuple(sorted(eps))))  # fmt: skip
    return out


def _is_v4(addr: Any) -> bool:
    try:
        return isinstance(ipaddress.ip_address(str(addr)), ipaddress.IPv4Address)
    except ValueError:
        return False


def ruleset(table: str, svc_rules: Iterable[Rule]) -> str:
    """The whole table, replaced in one nft transaction (create-if-missing, delete, define)."""
    dispatch: list[str] = []
    chains: list[str] = []
    refused: list[str] = []
    for i, r in enumerate(svc_rules):
        if not r.endpoints:
            # Nothing to send it to: refused at once, as kube-proxy does, instead of a connect that times out.
            if r.cluster_ip:
                refused.append(f"    ip daddr {r.cluster_ip} {r.protocol} dport {r.port} reject")
            if r.node_port:
                refused.append(f"    fib daddr type local {r.protocol} dport {r.node_port} reject")
            continue
        chain = f"svc_{i}"
        if len(r.endpoints) == 1:
            ip, port = r.endpoints[0]
            body = [f"    meta mark set meta mark | {MASQ_MARK:#x}",
                    f"    meta l4proto {r.protocol} dnat to {ip}:{port}"]  # fmt: skip
        else:
            picks = ", ".join(f"{j} : jump {chain}_ep{j}" for j in range(len(r.endpoints)))
            body = [f"    meta mark set meta mark | {MASQ_MARK:#x}",
                    f"    numgen random mod {len(r.endpoints)} vmap {{ {picks} }}"]  # fmt: skip
            for j, (ip, port) in enumerate(r.endpoints):
                chains.append(f"  chain {chain}_ep{j} {{\n    meta l4proto {r.protocol} dnat to {ip}:{port}\n  }}")
        chains.append(f"  chain {chain} {{\n" + "\n".join(body) + "\n  }")
        if r.cluster_ip:
            dispatch.append(f"    ip daddr {r.cluster_ip} {r.protocol} dport {r.port} jump {chain}")
        if r.node_port:
            dispatch.append(f"    fib daddr type local {r.protocol} dport {r.node_port} jump {chain}")
    services = "\n".join(dispatch)
    return f"""table ip {table} {{}}
delete table ip {table}
table ip {table} {{
  chain services {{
{services}
  }}
{chr(10).join(chains)}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    jump services
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    jump services
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    meta mark & {MASQ_MARK:#x} == {MASQ_MARK:#x} masquerade
  }}
  chain no_endpoints {{
{chr(10).join(refused)}
  }}
  chain filter_input {{
    type filter hook input priority filter - 10; policy accept;
    jump no_endpoints
  }}
  chain filter_forward {{
    type filter hook forward priority filter - 10; policy accept;
    jump no_endpoints
  }}
  chain filter_output {{
    type filter hook output priority filter - 10; policy accept;
    jump no_endpoints
  }}
}}
"""


def hosts(services: Iterable[JSON], slices: Iterable[JSON], domain: str = DEFAULT_DOMAIN) -> str:
    """hosts-file lines for cluster DNS."""
    headless: dict[tuple[str, str], set[str]] = {}
    for s in slices:
        meta = s.get("metadata") or {}
        svc = (meta.get("labels") or {}).get("kubernetes.io/service-name")
        if svc:
            for ep in s.get("endpoints") or []:
                if _ready(ep):
                    headless.setdefault((meta.get("namespace", ""), svc), set()).update(
                        a for a in ep.get("addresses") or [] if _is_v4(a))
    lines = []
    for svc in sorted(services, key=lambda s: (s["metadata"].get("namespace", ""), s["metadata"]["name"])):
        ns, name = svc["metadata"].get("namespace", ""), svc["metadata"]["name"]
        ip = (svc.get("spec") or {}).get("clusterIP")
        fqdn = f"{name}.{ns}.svc.{domain}"
        if ip and ip != "None":
            lines.append(f"{ip} {fqdn}")
        elif ip == "None":
            lines.extend(f"{a} {fqdn}" for a in sorted(headless.get((ns, name), ())))
    return "".join(f"{line}\n" for line in lines)


class ServiceRules:
    """Applies a node's Service table and DNS hosts file; remembers what it applied to skip no-op writes."""

    def __init__(self, state_dir: Path, domain: str = DEFAULT_DOMAIN) -> None:
        self.table = table_name(state_dir)
        self.hosts_dir = state_dir / "dns"
        self.domain = domain
        self._tmp = state_dir / "services.hosts.tmp"  # outside hosts_dir: dnsmasq must not read a half file
        self._applied: tuple[str, str] | None = None

    async def apply(self, services: list[JSON], slices: list[JSON]) -> None:
        text = ruleset(self.table, rules(services, slices))
        names = hosts(services, slices, self.domain)
        if self._applied == (text, names):
            return
        await netns.run(["nft", "-f", "-"], stdin=text.encode())
        self.hosts_dir.mkdir(parents=True, exist_ok=True)
        self._tmp.write_text(names)
        self._tmp.replace(self.hosts_dir / "services")
        self._applied = (text, names)

    async def remove(self) -> None:
        await netns.run(["nft", "delete", "table", "ip", self.table], check=False)
        self._applied = None
