"""Services over VMs on the CNI pod network: `virtctl expose` gives a ClusterIP (allocated by the API server),
the endpoints controller fills Endpoints/EndpointSlices from the launcher pod's IP, the node agent DNATs the
ClusterIP in nftables and serves cluster DNS names through each VMI's dnsmasq. One guest (client) resolves
`<svc>.<ns>.svc.cluster.local`, reaches the other guest (server) by pod IP (a headless Service's name) and
through the ClusterIP; the host reaches the ClusterIP and the NodePort too."""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import sys
from typing import Any

from tests.e2e.network.conftest import POD_CIDR, POD_GATEWAY
from tests.e2e.network.test_pod_network import delete_and_wait
from tests.e2e.node.conftest import VMIS, wait_until
from tests.e2e.node.test_node_agent import NS, _ready_node, vmi_body, wait_file
from virtplane.client import rest
from virtplane.network import services
from virtplane.testing.cluster import REPO

SERVICES = rest.GVR("", "v1", "services")
ENDPOINTS = rest.GVR("", "v1", "endpoints")
SLICES = rest.GVR("discovery.k8s.io", "v1", "endpointslices")

ROUTE_FIX = "ip route | grep -q '^default' || ip route add default via 10.0.2.1\n"
SERVER_SCRIPT = f"""#!/bin/sh
{ROUTE_FIX}printf '#!/bin/sh\\necho hello-from-server\\n' > /run/hello && chmod +x /run/hello
nc -ll -p 8080 -e /run/hello </dev/null >/dev/null 2>&1 &
echo E2E-SERVER up > /dev/console
"""
# The client learns everything through cluster DNS: the ClusterIP (hello) and the server's pod IP (hello-pods,
# headless). It retries for a while: the server boots at the same time.
CLIENT_SCRIPT = f"""#!/bin/sh
{ROUTE_FIX}echo "E2E-RESOLV $(grep -E '^(search|nameserver)' /etc/resolv.conf | tr '\\n' ' ')" > /dev/console
lookup() {{
  nslookup "$1" 2>/dev/null | awk '/^Name:/{{f=1}} f && /^Address/{{sub(/^Address( [0-9]+)?: */, ""); print; exit}}'
}}
i=0
while [ $i -lt 120 ]; do
  i=$((i+1))
  svc=$(lookup hello.{NS}.svc.cluster.local); pod=$(lookup hello-pods.{NS}.svc.cluster.local)
  [ -n "$svc" ] && [ -n "$pod" ] || {{ sleep 2; continue; }}
  a=$(echo | nc -w 5 "$pod" 8080 2>/dev/null); b=$(echo | nc -w 5 "$svc" 80 2>/dev/null)
  if [ "$a" = hello-from-server ] && [ "$b" = hello-from-server ]; then break; fi
  sleep 2
done
echo "E2E-DNS svc=$svc pod=$pod short=$(lookup hello)" > /dev/console
echo "E2E-POD-IP $a" > /dev/console
echo "E2E-CLUSTER-IP $b" > /dev/console
"""


async def virtctl(kubeconfig: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "virtplane.cli.virtctl", "--kubeconfig", kubeconfig, *args]
    return await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60, cwd=REPO)


async def tcp_hello(ip: str, port: int) -> bytes | None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), 3)
    except (OSError, TimeoutError):
        return None
    try:
        return await asyncio.wait_for(reader.read(100), 5) or None
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()


def nft_table() -> str:
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout


async def test_service_clusterip_and_dns_between_vms(env: dict[str, Any], admin: rest.Client) -> None:
    await wait_until(lambda: _ready_node(admin), 60, "node Ready")
    kubeconfig = str(env["cluster"].kubeconfig)
    server = vmi_body("server", env["image"], user_data=SERVER_SCRIPT)
    server["metadata"]["labels"] = {"app": "hello"}
    client = vmi_body("client", env["image"], user_data=CLIENT_SCRIPT)
    await admin.create(VMIS, server, NS)
    await admin.create(VMIS, client, NS)

    out = await virtctl(kubeconfig, "expose", "vmi", "server", "--name", "hello", "--port", "80",
                        "--target-port", "8080", "--type", "NodePort")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Service hello successfully exposed for vmi server" in out.stdout
    svc = await admin.get(SERVICES, "hello", NS)
    cluster_ip = svc["spec"]["clusterIP"]
    assert ipaddress.ip_address(cluster_ip) in ipaddress.ip_network("10.96.0.0/12"), svc["spec"]
    node_port = svc["spec"]["ports"][0]["nodePort"]
    assert 30000 <= node_port <= 32767
    headless = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hello-pods", "namespace": NS},
                "spec": {"clusterIP": "None", "selector": {"app": "hello"}, "ports": [{"port": 8080}]}}  # fmt: skip
    await admin.create(SERVICES, headless, NS)

    async def running(name: str) -> dict[str, Any] | None:
        vmi = await admin.get(VMIS, name, NS)
        phase = (vmi.get("status") or {}).get("phase")
        assert phase not in ("Failed", "Succeeded"), (vmi["status"].get("conditions"), env["agent"].log_tail())
        return vmi if phase == "Running" else None

    vmi = await wait_until(lambda: running("server"), 240, "server Running")
    await wait_until(lambda: running("client"), 240, "client Running")
    pod_ip = vmi["status"]["interfaces"][0]["ipAddress"]
    assert ipaddress.ip_address(pod_ip) in ipaddress.ip_network(POD_CIDR)

    async def endpoints() -> dict[str, Any] | None:
        try:
            ep = await admin.get(ENDPOINTS, "hello", NS)
        except rest.NotFound:
            return None
        addrs = [a["ip"] for s in ep.get("subsets") or [] for a in s.get("addresses") or []]
        return ep if addrs == [pod_ip] else None

    ep = await wait_until(endpoints, 60, "Endpoints hello = the server's pod IP")
    assert ep["subsets"][0]["ports"][0]["port"] == 8080
    assert ep["subsets"][0]["addresses"][0]["targetRef"]["name"].startswith("virt-launcher-server-")
    slices = (await admin.list(SLICES, NS, labelSelector="kubernetes.io/service-name=hello"))["items"]
    assert [e["addresses"] for e in slices[0]["endpoints"]] == [[pod_ip]]
    assert slices[0]["metadata"]["ownerReferences"][0]["name"] == "hello"

    runtime = env["root"] / "node" / "runtime"
    await wait_file(runtime / f"{NS}_server" / "console.log", r"E2E-SERVER up", 300)
    # The host (the node itself) through the ClusterIP and through the NodePort on a node address.
    reply = await wait_until(lambda: tcp_hello(cluster_ip, 80), 60, f"hello via {cluster_ip}:80")
    assert reply.strip() == b"hello-from-server"
    reply = await wait_until(lambda: tcp_hello(POD_GATEWAY, node_port), 30, f"hello via NodePort {node_port}")
    assert reply.strip() == b"hello-from-server"

    # Guest to guest: by name, by pod IP, through the ClusterIP.
    console = runtime / f"{NS}_client" / "console.log"
    await wait_file(console, r"E2E-CLUSTER-IP", 420)
    text = console.read_text(errors="replace")
    assert f"search {NS}.svc.cluster.local" in text, text[-3000:]  # DHCP domain-name: the pod's namespace
    assert "nameserver 10.0.2.1" in text
    assert f"E2E-DNS svc={cluster_ip} pod={pod_ip}" in text, text[-3000:]
    assert "E2E-POD-IP hello-from-server" in text, text[-3000:]
    assert "E2E-CLUSTER-IP hello-from-server" in text, text[-3000:]

    # Deleting the Service takes its Endpoints, EndpointSlice and node rules with it.
    await admin.delete(SERVICES, "hello", NS)
    await admin.delete(SERVICES, "hello-pods", NS)

    async def gone() -> bool:
        left = (await admin.list(SLICES, NS, labelSelector="kubernetes.io/service-name=hello"))["items"]
        try:
            await admin.get(ENDPOINTS, "hello", NS)
            return False
        except rest.NotFound:
            return not left

    await wait_until(gone, 60, "Endpoints/EndpointSlice of hello deleted")
    assert await wait_until(lambda: _none_if_replies(cluster_ip), 30, "ClusterIP rule removed")
    await delete_and_wait(admin, "client")
    await delete_and_wait(admin, "server")


async def _none_if_replies(ip: str) -> bool | None:
    return True if await tcp_hello(ip, 80) is None else None


async def test_service_without_endpoints_is_refused_at_once(env: dict[str, Any], admin: rest.Client) -> None:
    """kube-proxy's no-endpoint rule: a ClusterIP whose Service selects nothing refuses a connection at once
    (the client sees 'connection refused') instead of leaving it to time out."""
    await wait_until(lambda: _ready_node(admin), 60, "node Ready")
    body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "nobody", "namespace": NS},
            "spec": {"selector": {"app": "nobody-here"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    svc = await admin.create(SERVICES, body, NS)
    cluster_ip = svc["spec"]["clusterIP"]

    table = services.table_name((env["root"] / "node" / "network").resolve())

    async def rule() -> bool | None:
        proc = await asyncio.to_thread(subprocess.run, ["nft", "list", "table", "ip", table], capture_output=True,
                                       text=True)
        text = proc.stdout
        return True if f"ip daddr {cluster_ip} tcp dport 80 reject" in text else None

    try:
        await wait_until(rule, 60, f"the node's reject rule for {cluster_ip}:80")
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(cluster_ip, 80), 5)
        except ConnectionRefusedError:
            pass
        else:
            writer.close()
            raise AssertionError(f"{cluster_ip}:80 accepted a connection with no endpoints")
        assert loop.time() - start < 2.0  # refused, not timed out
    finally:
        await admin.delete(SERVICES, "nobody", NS)
