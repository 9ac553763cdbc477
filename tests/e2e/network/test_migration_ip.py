"""Live migration on the CNI pod network keeps the VMI's pod IP (KubeVirt users lose it, kubevirt#7967).

`virtplane up --nodes 2 --node-netns --pod-network cni`: a VM with a TCP server starts on one node (its pod IP
from that node's subnet); a client VM on that same node talks to it by pod IP in a loop. After `virtctl
migrate` the VMI runs on the other node with the same IP in its status and its launcher pod; the client
(same L2 subnet as the IP: the home node answers ARP for it and routes it away), and both nodes' own network
namespaces reach the server by that IP; the guest's tick counter continues. Migrating back home keeps it too,
and deleting the VM returns the address to the home node's IPAM."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.migration.conftest import TICK, vm_manifest
from tests.e2e.migration.test_migrate import phase
from tests.e2e.network.conftest import network_requirements
from tests.e2e.network.test_multinode import cleanup_pod_networks, kget
from tests.e2e.network.test_services import ROUTE_FIX, SERVER_SCRIPT
from tests.e2e.node.conftest import requirements
from tests.e2e.node.test_node_agent import vmi_body
from virtplane.network.nodenet import ClusterNetwork
from virtplane.testing import guest
from virtplane.testing.cluster import REPO, Cluster
from virtplane.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

REACH = re.compile(r"E2E-REACH (\d+) (\S*)")
HELLO = "hello-from-server"


class Env:
    def __init__(self, cluster: Cluster, image: str) -> None:
        self.c = cluster
        self.image = image
        net = cluster.node_network()
        self.net = ClusterNetwork(net["tag"], ipaddress.IPv4Network(net["subnet"]))

    def node_ns(self, node: str) -> str:
        return self.net.namespace(int(node.rsplit("-", 1)[1]))

    def runtime(self, node: str, name: str) -> Path:
        return self.c.data_dir / "nodes" / node / "runtime" / f"default_{name}"

    def text(self, node: str, name: str, file: str) -> str:
        try:
            return (self.runtime(node, name) / file).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def ticks(self, node: str, name: str) -> list[tuple[int, float]]:
        return [(int(n), float(up)) for n, up in TICK.findall(self.text(node, name, "guest.log"))]

    def vmi(self, name: str) -> dict[str, Any]:
        return kget(self.c, "vmi", name) or {}

    def hello_from_node(self, node: str, ip: str) -> str:
        """Connect to ip:8080 from the node's own netns (as the node's kubelet or a host-network pod would)."""
        code = (f"import socket\ns=socket.create_connection(({ip!r},8080),3)\ns.settimeout(5)\n"
                "print(s.recv(100).decode().strip())")  # fmt: skip
        p = subprocess.run(["ip", "netns", "exec", self.node_ns(node), sys.executable, "-c", code],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
        return p.stdout.strip()

    def reaches(self, client_node: str) -> list[tuple[int, str]]:
        return [(int(i), r) for i, r in REACH.findall(self.text(client_node, "cli", "console.log"))]

    def migrate(self, name: str) -> dict[str, Any]:
        env = {"KUBECONFIG": str(self.c.kubeconfig), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        before = {m["metadata"]["name"] for m in (kget(self.c, "vmim") or {}).get("items") or []}
        subprocess.run([sys.executable, "-m", "virtplane.cli.virtctl", "migrate", name], check=True, env=env,
                       cwd=REPO, capture_output=True, timeout=60)  # fmt: skip

        def done() -> dict[str, Any] | None:
            new = [m for m in (kget(self.c, "vmim") or {}).get("items") or [] if m["metadata"]["name"] not in before]
            return new[0] if new and phase(new[0]) in ("Succeeded", "Failed") else None

        vmim = wait_for(done, 240, what=f"the migration of {name} done")
        assert phase(vmim) == "Succeeded", json.dumps(vmim.get("status"))
        return vmim


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    requirements()
    network_requirements()
    root = tmp_path_factory.mktemp("netmig")
    short = Path(tempfile.mkdtemp(prefix="vpk-", dir="/tmp"))  # unix socket paths under the runtime dirs
    c = Cluster(short / "c", nodes=2, extra_args=("--pod-network", "cni"))
    try:
        c.start()
        with guest.registry_with_containerdisk(root / "registry", host=c.node_network()["gateway"]) as (_r, image):
            yield Env(c, image)
    finally:
        with contextlib.suppress(Exception):
            c.kubectl("delete", "vm,vmi", "--all", "--wait=true", "--timeout=90s", check=False, timeout=120)
        c.stop()
        cleanup_pod_networks(c.data_dir)
        shutil.rmtree(short, ignore_errors=True)


def diagnostics(env: Env) -> str:
    """What a failure needs said: the VMI, its pods and migrations, each node's routes, proxy entries and agent
    warnings, the client's last lines."""
    out = [json.dumps(env.vmi("srv").get("status"), indent=1)]
    for m in (kget(env.c, "vmim") or {}).get("items") or []:
        out.append(f"vmim {m['metadata']['name']}: {json.dumps(m.get('status'))}")
    for p in (kget(env.c, "pods") or {}).get("items") or []:
        st = p.get("status") or {}
        out.append(f"pod {p['metadata']['name']} {p['spec'].get('nodeName')} {st.get('phase')} {st.get('podIP')}")
    for node in ("virtplane-node-1", "virtplane-node-2"):
        for cmd in (["ip", "route"], ["ip", "neigh", "show", "proxy"]):
            p = subprocess.run(["ip", "netns", "exec", env.node_ns(node), *cmd], capture_output=True, text=True)
            out.append(f"{node} {' '.join(cmd)}:\n{p.stdout}{p.stderr}")
        log = env.c.data_dir / "nodes" / node / "agent.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        out += [f"{node}: {ln[:400]}" for ln in lines if '"warning"' in ln or '"error"' in ln or "pod IP" in ln][-30:]
        out.append(f"{node} client: {env.reaches(node)[-15:]}")
    return "\n".join(out)


def launcher_pods(env: Env, uid: str) -> list[dict[str, Any]]:
    items = (kget(env.c, "pods") or {}).get("items") or []
    return [p for p in items if p["metadata"].get("labels", {}).get("kubevirt.io/created-by") == uid]


def test_migration_keeps_the_pod_ip(env: Env) -> None:
    try:
        check_migration_keeps_the_pod_ip(env)
    except AssertionError as err:
        raise AssertionError(f"{err}\n--- diagnostics ---\n{diagnostics(env)}") from None


def check_migration_keeps_the_pod_ip(env: Env) -> None:
    env.c.kubectl("apply", "-f", "-", input=yaml.safe_dump(vm_manifest("srv", env.image, user_data=SERVER_SCRIPT)))
    wait_for(lambda: env.vmi("srv").get("status", {}).get("phase") == "Running", 240, what="srv Running")
    vmi = env.vmi("srv")
    home, uid = vmi["status"]["nodeName"], vmi["metadata"]["uid"]
    other = next(n for n in ("virtplane-node-1", "virtplane-node-2") if n != home)
    ip = wait_for(lambda: (env.vmi("srv")["status"].get("interfaces") or [{}])[0].get("ipAddress"), 60,
                  what="srv's pod IP")  # fmt: skip
    home_cidr = kget(env.c, "node", home)["spec"]["podCIDR"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(home_cidr), (ip, home_cidr)

    # a client VM on the same node (and so the same subnet) as the server, asking it by pod IP every 2 s
    client_script = f"""#!/bin/sh
{ROUTE_FIX}(i=0; while :; do i=$((i+1)); r=$(echo | nc -w 3 {ip} 8080 2>/dev/null)
echo "E2E-REACH $i ${{r:-none}}" > /dev/console; sleep 2; done) </dev/null >/dev/null 2>&1 &
"""
    cli = vmi_body("cli", env.image, user_data=client_script)
    cli["metadata"]["namespace"] = "default"
    cli["spec"]["nodeSelector"] = {"kubernetes.io/hostname": home}
    env.c.kubectl("apply", "-f", "-", input=yaml.safe_dump(cli))
    wait_for(lambda: any(r == HELLO for _, r in env.reaches(home)), 300, what="the client reaching srv by pod IP")
    assert env.hello_from_node(other, ip) == HELLO
    wait_for(lambda: len(env.ticks(home, "srv")) >= 2, 120, what="srv ticking")

    # there ...
    env.migrate("srv")
    vmi = env.vmi("srv")
    assert vmi["status"]["nodeName"] == other
    assert vmi["status"]["interfaces"][0]["ipAddress"] == ip, vmi["status"]["interfaces"]
    target_pod = next(p for p in launcher_pods(env, uid) if p["spec"]["nodeName"] == other)
    wait_for(lambda: next(p for p in launcher_pods(env, uid) if p["metadata"]["name"] ==
                          target_pod["metadata"]["name"])["status"].get("podIP") == ip, 60,
             what="the target launcher pod reporting the kept IP")  # fmt: skip
    last_source_tick = env.ticks(home, "srv")[-1] if env.ticks(home, "srv") else (0, 0.0)
    mark = max((i for i, _ in env.reaches(home)), default=0)
    wait_for(lambda: any(i > mark and r == HELLO for i, r in env.reaches(home)), 120,
             what="the client on the old node reaching the migrated srv by the same IP")  # fmt: skip
    assert wait_for(lambda: env.hello_from_node(home, ip) == HELLO, 60, what=f"{home}'s netns reaching {ip}")
    assert wait_for(lambda: env.hello_from_node(other, ip) == HELLO, 60, what=f"{other}'s netns reaching {ip}")
    wait_for(lambda: len(env.ticks(other, "srv")) >= 2, 60, what="ticks on the target")
    first = env.ticks(other, "srv")[0]
    assert first[0] > 3 and first[0] >= last_source_tick[0], (first, last_source_tick)
    # the home node keeps the address reserved for the VMI (host-local's file names it)
    ipam = env.c.data_dir / "nodes" / home / "network" / "ipam" / "virtplane-pod" / ip
    assert ipam.exists()

    # ... and back again: the home node's own IPAM still holds the address; the target gets it beside a link
    # address of its own
    env.migrate("srv")
    vmi = env.vmi("srv")
    assert vmi["status"]["nodeName"] == home and vmi["status"]["interfaces"][0]["ipAddress"] == ip
    mark = max((i for i, _ in env.reaches(home)), default=0)
    wait_for(lambda: any(i > mark and r == HELLO for i, r in env.reaches(home)), 120,
             what="the client reaching srv back on its home node")  # fmt: skip
    assert wait_for(lambda: env.hello_from_node(other, ip) == HELLO, 60, what=f"{other}'s netns reaching {ip}")
    assert wait_for(lambda: env.hello_from_node(home, ip) == HELLO, 60, what=f"{home}'s netns reaching {ip}")

    # the VM goes: the home node's IPAM gets the address back
    env.c.kubectl("delete", "vm", "srv", "--wait=true", "--timeout=120s", timeout=150)
    wait_for(lambda: not ipam.exists(), 90, what=f"{ip} released on {home}")
