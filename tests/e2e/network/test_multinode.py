"""The CNI pod network across nodes: `virtplane up --nodes 2 --node-netns --pod-network cni` gives each node
agent its own netns, pod subnet (Node.spec.podCIDR) and routes to the other node's subnet. A guest on node 1
reaches a guest on node 2 by pod IP and through a Service's ClusterIP, finding both through cluster DNS."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.network.conftest import network_requirements
from tests.e2e.network.test_services import CLIENT_SCRIPT, SERVER_SCRIPT
from tests.e2e.node.conftest import requirements
from tests.e2e.node.test_node_agent import vmi_body
from virtplane.testing import guest
from virtplane.testing.cluster import Cluster

NODE1, NODE2 = "virtplane-node-1", "virtplane-node-2"


def wait_for(fn: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def kget(c: Cluster, *args: str) -> Any:
    p = c.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(p.stdout) if p.returncode == 0 else None


def cleanup_pod_networks(data: Path) -> None:
    """What VMs deleted the hard way leave: dnsmasq (pid from the agent's state file) and the pod netns."""
    for state in data.glob("nodes/*/network/pods/*.json"):
        with contextlib.suppress(ValueError, OSError):
            s = json.loads(state.read_text())
            if s.get("dnsmasqPid"):
                os.kill(int(s["dnsmasqPid"]), signal.SIGTERM)
            subprocess.run(["ip", "netns", "delete", s["netns"]], check=False, capture_output=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str]]:
    requirements()
    network_requirements()
    root = tmp_path_factory.mktemp("netmulti")
    short = Path(tempfile.mkdtemp(prefix="vpn-", dir="/tmp"))  # unix socket paths under the runtime dirs
    c = Cluster(short / "c", nodes=2, extra_args=("--pod-network", "cni"))
    try:
        c.start()
        with guest.registry_with_containerdisk(root / "registry", host=c.node_network()["gateway"]) as (_r, image):
            yield c, image
    finally:
        with contextlib.suppress(Exception):
            c.kubectl("delete", "vmi", "--all", "--wait=true", "--timeout=90s", check=False, timeout=120)
        c.stop()
        cleanup_pod_networks(c.data_dir)
        shutil.rmtree(short, ignore_errors=True)


def test_vm_to_vm_across_nodes(cluster: tuple[Cluster, str]) -> None:
    c, image = cluster

    def ready_nodes() -> list[Any] | None:
        nodes = (kget(c, "nodes") or {}).get("items") or []
        ready = [n for n in nodes if any(x["type"] == "Ready" and x["status"] == "True"
                                         for x in (n.get("status") or {}).get("conditions") or [])]  # fmt: skip
        return ready if len(ready) == 2 else None

    nodes = {n["metadata"]["name"]: n for n in wait_for(ready_nodes, 120, "2 Ready nodes")}
    assert nodes[NODE1]["spec"]["podCIDR"] == "10.244.1.0/24"
    assert nodes[NODE2]["spec"]["podCIDR"] == "10.244.2.0/24"

    server = vmi_body("server", image, user_data=SERVER_SCRIPT)
    server["metadata"]["labels"] = {"app": "hello"}
    server["spec"]["nodeSelector"] = {"kubernetes.io/hostname": NODE2}
    client = vmi_body("client", image, user_data=CLIENT_SCRIPT)
    client["spec"]["nodeSelector"] = {"kubernetes.io/hostname": NODE1}
    svcs = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
             "spec": {**extra, "selector": {"app": "hello"}, "ports": [{"port": port, "targetPort": 8080}]}}
            for name, port, extra in (("hello", 80, {}), ("hello-pods", 8080, {"clusterIP": "None"}))]  # fmt: skip
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([server, client, *svcs]))

    def running(name: str) -> dict[str, Any] | None:
        vmi = kget(c, "vmi", name) or {}
        phase = (vmi.get("status") or {}).get("phase")
        if phase in ("Failed", "Succeeded"):  # say why in full: the status and the node agent's last words
            node = (vmi.get("status") or {}).get("nodeName") or ""
            log = c.data_dir / "nodes" / node / "agent.log"
            tail = log.read_text(errors="replace")[-4000:] if node and log.exists() else "(no agent log)"
            raise AssertionError(f"{name} {phase}: {json.dumps(vmi.get('status'), indent=1)}\nagent log:\n{tail}")
        return vmi if phase == "Running" else None

    srv = wait_for(lambda: running("server"), 300, "server Running")
    wait_for(lambda: running("client"), 300, "client Running")
    assert srv["status"]["nodeName"] == NODE2
    pod_ip = srv["status"]["interfaces"][0]["ipAddress"]
    assert pod_ip.startswith("10.244.2."), srv["status"]["interfaces"]
    cluster_ip = kget(c, "svc", "hello")["spec"]["clusterIP"]

    # node 1 routes node 2's pod subnet via node 2's address on the cluster bridge
    node1_ns = f"virtplane-{c.node_network()['tag']}-node-1"
    node2_ip = next(a["address"] for a in nodes[NODE2]["status"]["addresses"] if a["type"] == "InternalIP")
    routes = subprocess.run(["ip", "netns", "exec", node1_ns, "ip", "route"], capture_output=True, text=True).stdout
    assert f"10.244.2.0/24 via {node2_ip}" in routes, routes

    console = c.data_dir / "nodes" / NODE1 / "runtime" / "default_client" / "console.log"
    wait_for(lambda: console.exists() and "E2E-CLUSTER-IP" in console.read_text(errors="replace"), 480,
             "the client guest's report")  # fmt: skip
    text = console.read_text(errors="replace")
    assert f"E2E-DNS svc={cluster_ip} pod={pod_ip}" in text, text[-3000:]
    assert "E2E-POD-IP hello-from-server" in text, text[-3000:]  # node 1 → node 2 by pod IP
    assert "E2E-CLUSTER-IP hello-from-server" in text, text[-3000:]  # DNAT on node 1 → endpoint on node 2


def test_kubernetes_service_reaches_the_api_from_a_node(cluster: tuple[Cluster, str]) -> None:
    """`default/kubernetes`, as every Kubernetes cluster has it: ClusterIP the range's first address, port 443,
    Endpoints naming the API server where nodes reach it; from a node's netns `https://kubernetes.default.svc`
    (through the node's Service DNAT) answers, its certificate valid for that name."""
    import ipaddress

    from virtplane.network.nodenet import ClusterNetwork

    c, _image = cluster
    svc = kget(c, "svc", "kubernetes", "-n", "default")
    assert svc["spec"]["clusterIP"] == "10.96.0.1", svc["spec"]
    assert svc["spec"]["ports"][0]["port"] == 443 and svc["spec"]["ports"][0]["name"] == "https"
    net = c.node_network()
    ep = kget(c, "endpoints", "kubernetes", "-n", "default")
    address = ep["subsets"][0]["addresses"][0]["ip"]
    assert address == net["gateway"], ep  # the API server's address on the cluster bridge, not loopback
    _server, token, _ca = c.config()
    ns = ClusterNetwork(net["tag"], ipaddress.ip_network(net["subnet"])).namespace(1)

    ca = str(c.data_dir / "pki" / "ca.crt")

    def version() -> Any:
        p = subprocess.run(
            ["ip", "netns", "exec", ns, "curl", "-sS", "--max-time", "5", "--cacert", ca,
             "--resolve", "kubernetes.default.svc:443:10.96.0.1", "-H", f"Authorization: Bearer {token}",
             "https://kubernetes.default.svc/version"], capture_output=True, text=True)  # fmt: skip
        return json.loads(p.stdout) if p.returncode == 0 else None

    got = wait_for(version, 60, "https://kubernetes.default.svc/version from node 1's netns")
    assert got["gitVersion"].startswith("v1."), got
