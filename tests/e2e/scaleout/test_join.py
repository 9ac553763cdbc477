"""A node agent on another host joins the cluster over the network, kubeadm's way: `virtplane token create
--print-join-command` on the control plane, `virtplane node --server --token --discovery-token-ca-cert-hash` on
the new host (a network namespace with its own address, reaching the API server over a veth). The node
registers, runs a VM, and is refused once its token's Secret is deleted. A wrong CA hash or an unknown token
stops the join with a clear message."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.node.conftest import requirements
from virtplane.testing import guest
from virtplane.testing.cluster import REPO, Cluster
from virtplane.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

HOST_IP, NODE_IP = "10.231.77.1", "10.231.77.2"
NODE = "joined-node"


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="module")
def host() -> Iterator[str]:
    """Another host: a netns with NODE_IP/30, routed to this one (HOST_IP) over a veth pair."""
    if os.geteuid() != 0:
        pytest.skip("a second host in a network namespace needs root")
    ns, veth = f"vpjoin{secrets.token_hex(3)}", f"vpj{secrets.token_hex(3)}"
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "addr", "add", f"{HOST_IP}/30", "dev", veth)
        sh("ip", "link", "set", veth, "up")
        for cmd in (("ip", "link", "set", "lo", "up"), ("ip", "addr", "add", f"{NODE_IP}/30", "dev", "eth0"),
                    ("ip", "link", "set", "eth0", "up"), ("ip", "route", "add", "default", "via", HOST_IP)):
            sh("ip", "netns", "exec", ns, *cmd)
        yield ns
    finally:
        subprocess.run(["ip", "link", "delete", veth], capture_output=True)
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def virtplane(*args: str, netns: str | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run([*prefix, sys.executable, "-m", "virtplane.cli.main", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=60, **kw)


def test_node_joins_from_another_host_with_a_token(host: str, tmp_path: Path) -> None:
    requirements()
    c = Cluster(tmp_path / "c", extra_args=("--nodes", "0", "--bind-address", "0.0.0.0", "--tls-san", HOST_IP))
    c.start()
    agent: subprocess.Popen[bytes] | None = None
    node_dir = tmp_path / "node"
    try:
        port = c.config()[0].rsplit(":", 1)[1]
        out = virtplane("token", "create", "--kubeconfig", str(c.kubeconfig), "--print-join-command")
        assert out.returncode == 0, out.stderr
        m = re.fullmatch(r"virtplane node --server (\S+) --token ([a-z0-9]{6}\.[a-z0-9]{16}) "
                         r"--discovery-token-ca-cert-hash (sha256:[0-9a-f]{64}) --name NODE --data-dir DIR\n",
                         out.stdout)
        assert m, out.stdout
        token, ca_hash = m.group(2), m.group(3)
        server = f"https://{HOST_IP}:{port}"  # the address the other host reaches the control plane at

        # a CA hash that does not match, or a token the cluster does not know: refused, nothing written
        bad = virtplane("node", "--server", server, "--token", token, "--discovery-token-ca-cert-hash",
                        "sha256:" + "0" * 64, "--name", NODE, "--data-dir", str(node_dir), netns=host)
        assert bad.returncode == 1 and "refusing to join" in bad.stderr, bad.stderr
        bad = virtplane("node", "--server", server, "--token", "zzzzzz.zzzzzzzzzzzzzzzz",
                        "--discovery-token-ca-cert-hash", ca_hash, "--name", NODE, "--data-dir", str(node_dir),
                        netns=host)
        assert bad.returncode == 1 and "401" in bad.stderr, bad.stderr
        assert not (node_dir / "kubeconfig").exists()

        with guest.registry_with_containerdisk(tmp_path / "registry", host=HOST_IP) as (reg, image):
            with open(tmp_path / "agent.log", "ab") as log:
                agent = subprocess.Popen(
                    ["ip", "netns", "exec", host, sys.executable, "-m", "virtplane.cli.main", "node",
                     "--server", server, "--token", token, "--discovery-token-ca-cert-hash", ca_hash,
                     "--name", NODE, "--data-dir", str(node_dir), "--address", NODE_IP,
                     "--insecure-registry", reg.host],
                    stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)  # fmt: skip

            def node_ready() -> bool:
                p = c.kubectl("get", "node", NODE, "-o", "json", check=False)
                if p.returncode != 0:
                    return False
                conds = {x["type"]: x["status"] for x in json.loads(p.stdout)["status"].get("conditions") or []}
                return conds.get("Ready") == "True"

            wait_for(node_ready, 90, what=f"node {NODE} Ready (agent log: {tmp_path / 'agent.log'})")
            node = json.loads(c.kubectl("get", "node", NODE, "-o", "json").stdout)
            assert {"type": "InternalIP", "address": NODE_IP} in node["status"]["addresses"]

            vmi = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                   "metadata": {"name": "onjoined"},
                   "spec": {"nodeSelector": {"kubernetes.io/hostname": NODE}, "terminationGracePeriodSeconds": 0,
                            "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
                                       "resources": {"requests": {"memory": "128Mi"}}},
                            "volumes": [{"name": "root", "containerDisk": {"image": image}}]}}  # fmt: skip
            c.kubectl("apply", "-f", "-", input=json.dumps(vmi))

            def running() -> dict[str, Any] | None:
                p = c.kubectl("get", "vmi", "onjoined", "-o", "json", check=False)
                got = json.loads(p.stdout) if p.returncode == 0 else {}
                return got if (got.get("status") or {}).get("phase") == "Running" else None

            got = wait_for(running, 180, what="the VMI Running on the joined node")
            assert got["status"]["nodeName"] == NODE
            c.kubectl("delete", "vmi", "onjoined", "--wait=true", "--timeout=60s")

        # revoking: the token's Secret deleted, the node's credential is refused at once
        c.kubectl("delete", "secret", "-n", "kube-system", f"bootstrap-token-{token.split('.')[0]}")
        denied = subprocess.run(["kubectl", "--kubeconfig", str(node_dir / "kubeconfig"), "get", "nodes"],
                                capture_output=True, text=True, timeout=30)
        assert denied.returncode != 0 and "You must be logged in to the server" in denied.stderr, denied.stderr
    finally:
        if agent is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.pid, signal.SIGTERM)
            try:
                agent.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
        for pidfile in (node_dir / "runtime").glob("*/pid"):
            with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        c.stop()
