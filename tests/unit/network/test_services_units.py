"""Service rules on a node: which endpoints a Service port is spread over, the nftables table (checked by the
real `nft -c` when root), and the cluster DNS hosts file."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from virtplane.network import services
from virtplane.network.pod import upstream_resolvers


def svc(name: str, ip: str, ports: list[dict], type_: str = "ClusterIP") -> dict:
    return {"metadata": {"name": name, "namespace": "default"},
            "spec": {"type": type_, "clusterIP": ip, "ports": ports}}  # fmt: skip


def eps(service: str, ports: list[dict], endpoints: list[tuple[str, bool]]) -> dict:
    return {"metadata": {"name": f"{service}-abcde", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "ports": ports,
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}} for ip, ready in endpoints]}  # fmt: skip


SERVICES = [
    svc("web", "10.96.0.10", [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080}],
        "NodePort"),
    svc("dns", "10.96.0.53", [{"name": "", "port": 53, "protocol": "UDP"}]),
    svc("headless", "None", [{"port": 80}]),
    svc("empty", "10.96.0.11", [{"port": 80}]),
]
SLICES = [
    eps("web", [{"name": "http", "port": 8080, "protocol": "TCP"}],
        [("10.244.0.5", True), ("10.244.0.6", True), ("10.244.0.7", False)]),
    eps("dns", [{"name": "", "port": 5353, "protocol": "UDP"}], [("10.244.0.9", True)]),
    eps("headless", [{"name": "", "port": 80, "protocol": "TCP"}], [("10.244.0.8", True)]),
]


def test_rules_take_ready_endpoints_by_port_name() -> None:
    rules = {r.cluster_ip: r for r in services.rules(SERVICES, SLICES)}
    assert rules["10.96.0.10"].endpoints == (("10.244.0.5", 8080), ("10.244.0.6", 8080))  # not-ready left out
    assert rules["10.96.0.10"].node_port == 30080
    assert rules["10.96.0.53"].protocol == "udp" and rules["10.96.0.53"].endpoints == (("10.244.0.9", 5353),)
    assert rules["10.96.0.11"].endpoints == ()
    assert "None" not in rules  # headless: DNS only


def test_ruleset_shape() -> None:
    text = services.ruleset("virtplane_svc_test", services.rules(SERVICES, SLICES))
    assert text.startswith("table ip virtplane_svc_test {}\ndelete table ip virtplane_svc_test\n")  # atomic swap
    chain = re.search(r"ip daddr 10\.96\.0\.10 tcp dport 80 jump (svc_\d+)\n", text)
    assert chain, text
    c = chain.group(1)
    assert f"fib daddr type local tcp dport 30080 jump {c}\n" in text
    assert f"numgen random mod 2 vmap {{ 0 : jump {c}_ep0, 1 : jump {c}_ep1 }}" in text
    assert "meta l4proto tcp dnat to 10.244.0.6:8080" in text
    assert "meta l4proto udp dnat to 10.244.0.9:5353" in text
    # no endpoints: no DNAT, refused at once (kube-proxy's no-endpoint reject) from the node, its pods and NodePorts
    assert "ip daddr 10.96.0.11 tcp dport 80 jump" not in text
    no_eps = re.search(r"chain no_endpoints \{\n(.*?)\n  \}", text, re.S)
    assert no_eps and no_eps.group(1).strip() == "ip daddr 10.96.0.11 tcp dport 80 reject", text
    for hook in ("input", "forward", "output"):
        assert f"type filter hook {hook} priority filter - 10; policy accept;\n    jump no_endpoints" in text


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="nft -c needs root")
def test_ruleset_is_valid_nftables() -> None:
    text = services.ruleset("virtplane_svc_unit", services.rules(SERVICES, SLICES))
    proc = subprocess.run(["nft", "-c", "-f", "-"], input=text, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_hosts_file() -> None:
    text = services.hosts(SERVICES, SLICES)
    assert "10.96.0.10 web.default.svc.cluster.local\n" in text
    assert "10.244.0.8 headless.default.svc.cluster.local\n" in text  # headless: the endpoints
    assert "10.96.0.11 empty.default.svc.cluster.local\n" in text


def test_table_name_is_per_state_dir() -> None:
    a, b = services.table_name(Path("/a/network")), services.table_name(Path("/b/network"))
    assert a != b and a.startswith("virtplane_svc_") and len(a) < 32


def test_upstream_resolvers_skip_loopback(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.53\nnameserver 10.1.2.3\nsearch x\nnameserver fe80::1%eth0\n")
    assert upstream_resolvers(conf) == ["10.1.2.3", "fe80::1"]


def test_routes_to_other_nodes_pod_subnets() -> None:
    from virtplane.cli.nodes import pod_network_args
    from virtplane.node.routes import wanted_routes

    def node(name: str, cidr: str | None, ip: str) -> dict:
        return {"metadata": {"name": name}, "spec": {"podCIDR": cidr} if cidr else {},
                "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}  # fmt: skip

    nodes = [node("n1", "10.244.1.0/24", "10.224.0.11"), node("n2", "10.244.2.0/24", "10.224.0.12"),
             node("n3", None, "10.224.0.13"), node("n4", "10.244.4.0/24", "127.0.0.1")]  # fmt: skip
    assert wanted_routes(nodes, "n1", "10.244.1.0/24") == {"10.244.2.0/24": "10.224.0.12"}
    assert pod_network_args("user", 2) == ()
    assert pod_network_args("cni", 2) == ("--pod-network", "cni", "--pod-cidr", "10.244.2.0/24")
