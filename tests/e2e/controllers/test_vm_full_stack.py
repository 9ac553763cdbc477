"""A VirtualMachine from `kubectl apply` to a running guest and back, with every real component in the loop:
API server, VM/VMI controllers, scheduler, a real node agent and QEMU (TCG) booting the tiny containerDisk
from a real registry. Nothing is faked; the VM controller's side is what is checked here."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.controllers.test_vm_runtime import condition, get, launcher_pods, subresource, vm_status, wait_for
from tests.e2e.node.conftest import NodeAgentProc, component_kubeconfig, requirements
from virtplane.testing import guest
from virtplane.testing.cluster import Cluster

pytestmark = pytest.mark.e2e
JSON = dict[str, Any]
BOOT = 180.0  # TCG on a busy 2-core machine


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str]]:
    requirements()
    root = tmp_path_factory.mktemp("fullstack")
    cluster = Cluster(root / "cluster", extra_args=("--nodes", "0"))
    cluster.start()
    agent: NodeAgentProc | None = None
    try:
        with guest.registry_with_containerdisk(root / "registry") as (_reg, image):
            agent = NodeAgentProc(component_kubeconfig(cluster, root / "node.kubeconfig"), root / "node",
                                  root / "node-agent.log")
            agent.start()
            yield cluster, image
    finally:
        if agent is not None:
            agent.stop()
        for pidfile in (root / "node" / "runtime").glob("*/pid"):  # leftover VMs, by pid
            with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        cluster.stop()


def vm_manifest(name: str, image: str, strategy: str = "Always") -> str:
    return json.dumps({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": name},
        "spec": {"runStrategy": strategy, "template": {
            "metadata": {"labels": {"app": name}},
            "spec": {
                "terminationGracePeriodSeconds": 10,
                "domain": {"resources": {"requests": {"memory": "256Mi"}},
                           "devices": {"disks": [{"name": "containerdisk", "disk": {"bus": "virtio"}}],
                                       "interfaces": [{"name": "default", "masquerade": {}}]}},
                "networks": [{"name": "default", "pod": {}}],
                "volumes": [{"name": "containerdisk", "containerDisk": {"image": image}}],
            }}},
    })


def running(c: Cluster, name: str) -> JSON | None:
    st = vm_status(c, name)
    return st if st.get("printableStatus") == "Running" and st.get("ready") else None


def test_vm_runs_restarts_and_stops(stack: tuple[Cluster, str]) -> None:
    c, image = stack
    wait_for(lambda: (n := get(c, "nodes")) and n["items"], "the node agent's Node", timeout=60, cluster=c)
    c.kubectl("apply", "-f", "-", input=vm_manifest("vm-full", image))

    st = wait_for(lambda: running(c, "vm-full"), "VM Running and Ready", timeout=BOOT, cluster=c)
    assert st["created"] is True and condition({"status": st}, "Ready")["status"] == "True"  # type: ignore[index]
    assert "Running" in c.kubectl("get", "vm", "vm-full").stdout
    first = get(c, "vmi", "vm-full")
    assert first["status"]["phase"] == "Running"
    assert condition(first, "LiveMigratable")["status"] == "True"  # type: ignore[index]

    subresource(c, "vm-full", "restart")
    wait_for(lambda: vm_status(c, "vm-full").get("printableStatus") in ("Stopping", "Starting"), "restarting",
             cluster=c)
    second = wait_for(lambda: (v := get(c, "vmi", "vm-full")) and v["metadata"]["uid"] != first["metadata"]["uid"]
                      and v["status"].get("phase") == "Running" and v, "the restarted VMI", timeout=BOOT, cluster=c)
    assert launcher_pods(c, first["metadata"]["uid"]) == []  # the old launcher went with its VMI
    wait_for(lambda: running(c, "vm-full"), "Running again", timeout=60, cluster=c)

    started = time.monotonic()
    c.kubectl("patch", "vm", "vm-full", "--type", "merge", "-p", '{"spec":{"runStrategy":"Halted"}}')
    wait_for(lambda: get(c, "vmi", "vm-full") is None, "the node agent's graceful shutdown", timeout=60, cluster=c)
    assert time.monotonic() - started < 60
    st = wait_for(lambda: (s := vm_status(c, "vm-full")).get("printableStatus") == "Stopped" and s, "Stopped",
                  cluster=c)
    assert st["created"] is False and st["ready"] is False and "startFailure" not in st
    wait_for(lambda: launcher_pods(c, second["metadata"]["uid"]) == [], "the launcher pod collected", cluster=c)
    c.kubectl("delete", "vm", "vm-full", "--timeout=60s")
    assert get(c, "vm", "vm-full") is None
