"""Fixtures for the migration e2e tests: one `virtplane up --nodes 3 --node-netns` for the package (each node
agent in its own network namespace on the cluster's bridge) and a registry on the host's bridge address
holding the tiny containerDisk, which every node can reach.

The guest's heartbeat `virtplane-guest: tick N UPTIME` goes to its virtio console, which QEMU writes to
`<node data dir>/runtime/<namespace>_<name>/guest.log` on whichever node runs it.
"""

from __future__ import annotations

import json
import os
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

from virtplane.testing import guest
from virtplane.testing.cluster import Cluster
from virtplane.testing.waiting import wait_for

NODES = 3
TICK = re.compile(r"virtplane-guest: tick (\d+) ([0-9.]+)")


def requirements() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    for tool in ("qemu-system-x86_64", "qemu-img", "xorriso", "nsenter", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    if not Path("/usr/bin/docker-registry").exists():
        pytest.skip("docker-registry not installed")
    if not (guest.IMAGES_OUT / "containerdisk-oci" / "index.json").exists():
        pytest.skip("guest images missing (run `make images`)")


class Env:
    def __init__(self, cluster: Cluster, image: str) -> None:
        self.cluster = cluster
        self.image = image

    def kubectl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl(*args, **kw)

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        proc = self.kubectl("get", kind, name, "-o", "json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def apply(self, obj: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump(obj))

    def virtctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig)}
        proc = subprocess.run([sys.executable, "-m", "virtplane.cli.virtctl", *args], capture_output=True,
                              text=True, env=env, timeout=120)  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"virtctl {' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def runtime_dir(self, node: str, name: str, namespace: str = "default") -> Path:
        return self.cluster.data_dir / "nodes" / node / "runtime" / f"{namespace}_{name}"

    def guest_log(self, node: str, name: str) -> str:
        try:
            return (self.runtime_dir(node, name) / "guest.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def ticks(self, node: str, name: str) -> list[tuple[int, float]]:
        return [(int(n), float(up)) for n, up in TICK.findall(self.guest_log(node, name))]

    def events_of(self, name: str) -> list[dict[str, Any]]:
        """The events about object `name`, oldest first."""
        items = json.loads(self.kubectl("get", "events", "-o", "json").stdout)["items"]
        return sorted((e for e in items if e["involvedObject"].get("name") == name),
                      key=lambda e: (e["metadata"]["creationTimestamp"], e["metadata"]["name"]))

    def vmi_node(self, name: str) -> str:
        return ((self.get("vmi", name) or {}).get("status") or {}).get("nodeName", "")

    def qemu_pid(self, node: str, name: str) -> int | None:
        try:
            return int((self.runtime_dir(node, name) / "pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None


def vm_manifest(name: str, image: str, *, memory: str = "128Mi", eviction: str | None = None,
                labels: dict[str, str] | None = None, user_data: str | None = None) -> dict[str, Any]:  # fmt: skip
    spec: dict[str, Any] = {
        "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
                   "resources": {"requests": {"memory": memory}}},
        "volumes": [{"name": "root", "containerDisk": {"image": image}}],
    }
    if user_data is not None:
        spec["domain"]["devices"]["disks"].append({"name": "cloudinit", "disk": {"bus": "virtio"}})
        spec["volumes"].append({"name": "cloudinit", "cloudInitNoCloud": {"userData": user_data}})
    if eviction:
        spec["evictionStrategy"] = eviction
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": name},
            "spec": {"runStrategy": "Always", "template": {
                "metadata": {"labels": {"kubevirt.io/vm": name, **(labels or {})}}, "spec": spec}}}


def wait_ticking(env: Env, name: str, timeout: float = 180) -> str:
    """The VMI runs and its guest ticks; returns its node."""
    wait_for(lambda: ((env.get("vmi", name) or {}).get("status") or {}).get("phase") == "Running", timeout,
             what=f"{name} Running")
    node = env.vmi_node(name)
    wait_for(lambda: len(env.ticks(node, name)) >= 2, timeout, what=f"{name} ticking on {node}")
    return node


@pytest.fixture(scope="package")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    requirements()
    root = tmp_path_factory.mktemp("migration")
    # short: VM runtime dirs under DATA/nodes/<node>/runtime/<ns>_<name> hold unix sockets (107-byte limit)
    short = Path(tempfile.mkdtemp(prefix="vpm-", dir="/tmp"))
    cluster = Cluster(short / "c", nodes=NODES)
    try:
        cluster.start()
        gateway = cluster.node_network()["gateway"]
        with guest.registry_with_containerdisk(root / "registry", host=gateway) as (_reg, image):
            e = Env(cluster, image)
            wait_for(lambda: len([n for n in json.loads(e.kubectl("get", "nodes", "-o", "json").stdout)["items"]
                                  if any(c["type"] == "Ready" and c["status"] == "True"
                                         for c in (n.get("status") or {}).get("conditions") or [])]) == NODES,
                     120, what="3 Ready nodes")  # fmt: skip
            yield e
    finally:
        cluster.stop()
        shutil.rmtree(short, ignore_errors=True)
