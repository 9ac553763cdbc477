"""`virtplane up --nodes 3 --node-netns`: every node agent in its own network namespace with its own address."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import NODES, Env, vm_manifest, wait_ticking

pytestmark = pytest.mark.e2e


def test_each_node_has_its_own_namespace_and_address(env: Env) -> None:
    nodes = json.loads(env.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    addresses = {n["metadata"]["name"]: n["status"]["addresses"][0]["address"] for n in nodes}
    assert len(set(addresses.values())) == NODES
    net = env.cluster.node_network()
    for name in addresses:
        pid = int((env.cluster.data_dir / "nodes" / name / "agent.pid").read_text())
        # the agent's network namespace is not ours, and is the cluster's named one for that node
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        index = name.rsplit("-", 1)[1]
        named = f"/var/run/netns/virtplane-{net['tag']}-node-{index}"
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(named).st_ino
        assert Path(f"/sys/class/net/{net['bridge']}").exists()


def test_vm_on_a_netns_node_runs_and_subresources_reach_its_agent(env: Env) -> None:
    env.apply(vm_manifest("netns-vm", env.image))
    try:
        node = wait_ticking(env, "netns-vm")
        pid = env.qemu_pid(node, "netns-vm")
        assert pid is not None
        agent_pid = int((env.cluster.data_dir / "nodes" / node / "agent.pid").read_text())
        assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink(f"/proc/{agent_pid}/ns/net")
        # the API server proxies to the agent at the node's bridge address: pause/unpause go through
        env.virtctl("pause", "vmi", "netns-vm")
        env.virtctl("unpause", "vmi", "netns-vm")
    finally:
        env.kubectl("delete", "vm", "netns-vm", "--wait=false", check=False)
