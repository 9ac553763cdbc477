"""Pods and a VM on one CNI pod network (a real `virtplane up --nodes 0` cluster and a `virtplane node
--pod-network cni` agent, which puts pods on the same bridge and subnet as VMs): the VM fetches a page from a
busybox httpd pod by pod IP and through its Service's ClusterIP; a pod reaches the port the VM serves by the
VM's pod IP and through the Service `virtctl expose` made for it. Needs root."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.network.conftest import CNINodeAgent, network_requirements
from tests.e2e.node.conftest import NODE, component_kubeconfig
from virtplane.network import services
from virtplane.testing import containers, guest
from virtplane.testing.cluster import REPO, Cluster
from virtplane.testing.waiting import wait_for

from .conftest import ready
from .conftest import requirements as pod_requirements

POD_CIDR = "10.244.98.0/24"
BRIDGE = "vpe2e1"  # neither vp0 (a real agent's) nor the network tests' vpe2e0: both may run beside this
NS = "default"


@pytest.fixture(scope="module")
def vmnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    pod_requirements()
    network_requirements()
    root = tmp_path_factory.mktemp("vmpods")
    cni_config = root / "10-pod.conflist"
    cni_config.write_text(json.dumps({"cniVersion": "1.0.0", "name": "e2e-vm-pods", "plugins": [{
        "type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]], "routes": [{"dst": "0.0.0.0/0"}],
                 "dataDir": str(root / "ipam")}}]}))  # fmt: skip
    cluster = Cluster(root / "cluster", extra_args=("--nodes", "0"))
    node_dir = root / "nodes" / NODE  # containers.cleanup_node_pods looks under nodes/*/pods
    agent: CNINodeAgent | None = None
    cluster.start()
    try:
        with guest.registry_with_containerdisk(root / "registry") as (reg, vm_image):
            busybox = containers.push_busybox_image(reg.host, root)
            agent = CNINodeAgent(component_kubeconfig(cluster, root / "node.kubeconfig"), node_dir,
                                 root / "node-agent.log", cni_config)  # fmt: skip
            agent.start()
            yield {"cluster": cluster, "agent": agent, "vm_image": vm_image, "busybox": busybox, "node_dir": node_dir}
    finally:
        if agent is not None:
            agent.stop()
        for pidfile in (node_dir / "runtime").glob("*/pid"):  # QEMUs outlive their agent by design
            with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        for state in (node_dir / "network" / "pods").glob("*.json"):
            with contextlib.suppress(ValueError, OSError):
                data = json.loads(state.read_text())
                if data.get("dnsmasqPid"):
                    os.kill(int(data["dnsmasqPid"]), signal.SIGTERM)
                subprocess.run(["ip", "netns", "delete", data["netns"]], check=False, capture_output=True)
        containers.cleanup_node_pods(root)
        subprocess.run(["ip", "link", "delete", BRIDGE], check=False, capture_output=True)
        table = services.table_name((node_dir / "network").resolve())
        subprocess.run(["nft", "delete", "table", "ip", table], check=False, capture_output=True)
        cluster.stop()


def guest_script(pod_ip: str, cluster_ip: str) -> str:
    """The VM serves hello-from-vm on 8080 and fetches the pod's page by pod IP and by ClusterIP (retrying:
    pods and VM come up together), reporting on its console."""
    return f"""#!/bin/sh
ip route | grep -q '^default' || ip route add default via 10.0.2.1
printf '#!/bin/sh\\necho hello-from-vm\\n' > /run/hello && chmod +x /run/hello
nc -ll -p 8080 -e /run/hello </dev/null >/dev/null 2>&1 &
echo E2E-VM-SERVER up > /dev/console
get() {{  # $1 host, $2 port: the body of GET /index.html (the guest's static busybox wget segfaults here)
  printf 'GET /index.html HTTP/1.0\\r\\nHost: %s\\r\\n\\r\\n' "$1" | nc -w 5 "$1" "$2" 2>/dev/null | tail -n 1
}}
i=0
while [ $i -lt 90 ]; do
  i=$((i+1))
  a=$(get {pod_ip} 8080); b=$(get {cluster_ip} 80)
  if [ "$a" = hello-from-pod ] && [ "$b" = hello-from-pod ]; then break; fi
  sleep 2
done
echo "E2E-POD-IP $a" > /dev/console
echo "E2E-CLUSTER-IP $b" > /dev/console
"""


def test_vm_and_pods_reach_each_other(vmnet: dict[str, Any]) -> None:
    cluster: Cluster = vmnet["cluster"]

    def kubectl(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return cluster.kubectl(*args, **kw)

    def pod(name: str) -> dict[str, Any] | None:
        proc = kubectl("get", "pod", name, "-o", "json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    wait_for(lambda: "True" in kubectl("get", "node", NODE, "-o",
                                       "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                                       check=False).stdout, 120, what="node Ready")  # fmt: skip
    image = vmnet["busybox"]
    kubectl("apply", "-f", "-", input=f"""
apiVersion: v1
kind: Pod
metadata: {{name: web, labels: {{app: web}}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: httpd
    image: {image}
    command: ["sh", "-c", "mkdir -p /www && echo hello-from-pod > /www/index.html && exec httpd -f -p 8080 -h /www"]
    readinessProbe: {{httpGet: {{path: /index.html, port: 8080}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: caller}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {{name: sh, image: {image}, command: ["sleep", "3600"]}}
""")
    web = wait_for(lambda: (p := pod("web")) and ready(p) and p, 180, what="pod web Ready")
    pod_ip = web["status"]["podIP"]
    assert ipaddress.ip_address(pod_ip) in ipaddress.ip_network(POD_CIDR)  # the VMs' network, not a pods-only one
    web_svc = json.loads(kubectl("get", "service", "web", "-o", "json").stdout)["spec"]["clusterIP"]

    vmi = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
           "metadata": {"name": "vm", "namespace": NS, "labels": {"app": "vm"}},
           "spec": {"terminationGracePeriodSeconds": 5,
                    "domain": {"resources": {"requests": {"memory": "256Mi"}},
                               "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}},
                                                     {"name": "ci", "disk": {"bus": "virtio"}}],
                                           "interfaces": [{"name": "default", "masquerade": {}}], "rng": {}}},
                    "networks": [{"name": "default", "pod": {}}],
                    "volumes": [{"name": "root", "containerDisk": {"image": vmnet["vm_image"]}},
                                {"name": "ci", "cloudInitNoCloud": {"userData": guest_script(pod_ip, web_svc)}}]}}
    kubectl("apply", "-f", "-", input=json.dumps(vmi))
    expose = subprocess.run([sys.executable, "-m", "virtplane.cli.virtctl", "--kubeconfig", str(cluster.kubeconfig),
                             "expose", "vmi", "vm", "--name", "vm-svc", "--port", "80", "--target-port", "8080"],
                            capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert expose.returncode == 0, expose.stderr
    vm_svc = json.loads(kubectl("get", "service", "vm-svc", "-o", "json").stdout)["spec"]["clusterIP"]

    def running() -> dict[str, Any] | None:
        obj = json.loads(kubectl("get", "vmi", "vm", "-o", "json").stdout)
        phase = (obj.get("status") or {}).get("phase")
        assert phase not in ("Failed", "Succeeded"), (obj.get("status"), vmnet["agent"].log_tail())
        return obj if phase == "Running" else None

    vm_ip = wait_for(running, 300, interval=1, what="VMI Running")["status"]["interfaces"][0]["ipAddress"]
    assert ipaddress.ip_address(vm_ip) in ipaddress.ip_network(POD_CIDR)
    console = vmnet["node_dir"] / "runtime" / f"{NS}_vm" / "console.log"

    def console_has(text: str) -> bool:
        with contextlib.suppress(FileNotFoundError):
            return text in console.read_text(errors="replace")
        return False

    wait_for(lambda: console_has("E2E-VM-SERVER up"), 420, interval=1, what="guest server up")

    # a pod reaches the VM's port: by the VM's pod IP and through the Service virtctl expose made
    def from_caller(host: str, port: int) -> str:
        proc = kubectl("exec", "caller", "--", "sh", "-c", f"echo | nc -w 5 {host} {port}", check=False)
        return proc.stdout.strip()

    wait_for(lambda: from_caller(vm_ip, 8080) == "hello-from-vm", 120, interval=1, what="pod → VM pod IP")
    wait_for(lambda: from_caller(vm_svc, 80) == "hello-from-vm", 120, interval=1, what="pod → VM Service")

    # the VM fetched the pod's page by pod IP and through the pod's Service
    wait_for(lambda: console_has("E2E-CLUSTER-IP"), 300, interval=1, what="guest's fetches done")
    text = console.read_text(errors="replace")
    assert "E2E-POD-IP hello-from-pod" in text, text[-3000:]
    assert "E2E-CLUSTER-IP hello-from-pod" in text, text[-3000:]

    kubectl("delete", "vmi", "vm", "--wait=false")
    kubectl("delete", "pod", "web", "caller")
    kubectl("delete", "service", "web", "vm-svc")
    wait_for(lambda: kubectl("get", "vmi", "vm", check=False).returncode != 0, 120, interval=1, what="VMI gone")
