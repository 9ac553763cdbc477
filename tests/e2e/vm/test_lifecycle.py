"""A user's VM life through `virtplane up`: kubectl apply, virtctl verbs, what the console shows.

Everything is observed the way a user observes it: kubectl output, VM/VMI status, Events, and the
guest's serial console through the `consolelog` subresource.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from virtplane.testing import guest
from virtplane.testing.cluster import Cluster
from virtplane.testing.waiting import wait_for

pytestmark = pytest.mark.e2e
SUB = "/apis/subresources.kubevirt.io/v1/namespaces/default"
V1 = Path("/sys/fs/cgroup/cpu/cpu.shares").exists()  # cgroup v1's cpu hierarchy, else v2's unified one


def cpu_cgroup(pid: int) -> str:
    """The process's cgroup in the CPU controller's hierarchy, e.g. /virtplane-system."""
    line = next(ln for ln in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                if "cpu" in ln.split(":")[1].split(",") or ln.startswith("0::"))
    return line.split(":", 2)[2]


def cpu_weight(rel: str) -> str:
    return (Path(f"/sys/fs/cgroup/cpu{rel}/cpu.shares") if V1 else Path(f"/sys/fs/cgroup{rel}/cpu.weight")) \
        .read_text().strip()

# The user's workload: counts on the serial console once a second, so pauses and restarts are visible.
TICKER = """#!/bin/sh
echo "cloud-init says hello from $(hostname)" > /dev/ttyS0
( i=0; while true; do echo "user-tick $i" > /dev/ttyS0; i=$((i+1)); sleep 1; done ) &
"""


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with guest.registry_with_containerdisk(tmp_path_factory.mktemp("registry")) as (_, ref):
        yield ref


def vm_manifest(name: str, image: str, *, run_strategy: str = "Always", memory: str = "128Mi",
                user_data: str = TICKER, disk_bus: str = "virtio") -> str:
    return yaml.safe_dump({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {"runStrategy": run_strategy, "template": {
            "metadata": {"labels": {"kubevirt.io/vm": name}},
            "spec": {
                "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": disk_bus}},
                                                 {"name": "cloudinit", "disk": {"bus": disk_bus}}]},
                           "resources": {"requests": {"memory": memory}}},
                "volumes": [{"name": "root", "containerDisk": {"image": image}},
                            {"name": "cloudinit", "cloudInitNoCloud": {"userData": user_data}}],
            }}},
    })


def get(cluster: Cluster, kind: str, name: str) -> dict[str, Any] | None:
    proc = cluster.kubectl("get", kind, name, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def console(cluster: Cluster, name: str) -> str:
    try:
        return cluster.get_raw(f"{SUB}/virtualmachineinstances/{name}/consolelog").decode(errors="replace")
    except OSError:
        return ""


def virtctl(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    proc = subprocess.run([sys.executable, "-m", "virtplane.cli.virtctl", *args], capture_output=True, text=True,
                          env=env, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"virtctl {' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc


def vmi_phase(cluster: Cluster, name: str) -> str:
    vmi = get(cluster, "vmi", name)
    return (vmi or {}).get("status", {}).get("phase", "")


def ticks(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"user-tick (\d+)", text)]


def last_tick(cluster: Cluster, name: str) -> int:
    """The guest's latest count on its serial console; -1 while the console cannot be read."""
    t = ticks(console(cluster, name))
    return t[-1] if t else -1


def wait_running_and_booted(cluster: Cluster, name: str, timeout: float = 120) -> dict[str, Any]:
    wait_for(lambda: vmi_phase(cluster, name) == "Running", timeout, what=f"{name} Running")
    wait_for(lambda: "virtplane-guest: booted" in console(cluster, name), timeout, what=f"{name} booted")
    vmi = get(cluster, "vmi", name)
    assert vmi is not None
    return vmi


def test_vm_runs_boots_and_applies_cloud_init(cluster: Cluster, image: str) -> None:
    cluster.kubectl("apply", "-f", "-", input=vm_manifest("life", image))
    vmi = wait_running_and_booted(cluster, "life")
    assert vmi["status"]["nodeName"].startswith("virtplane-node-")
    assert vmi["metadata"]["ownerReferences"][0]["kind"] == "VirtualMachine"
    wait_for(lambda: "cloud-init says hello from life" in console(cluster, "life"), 60, what="cloud-init")
    wait_for(lambda: len(ticks(console(cluster, "life"))) >= 2, 30, what="ticks")

    vm = wait_for(lambda: (v := get(cluster, "vm", "life")) and v.get("status", {}).get("ready") and v, 30)
    assert vm["status"]["printableStatus"] == "Running"
    rows = cluster.kubectl("get", "vmi", "life").stdout.splitlines()
    header, row = rows[0].split(), rows[1].split()
    assert header[:5] == ["NAME", "AGE", "PHASE", "IP", "NODENAME"]
    assert row[2] == "Running" and row[4] == vmi["status"]["nodeName"]
    assert re.match(r"\d+\.\d+\.\d+\.\d+", row[3]), row
    pods = cluster.kubectl("get", "pods", "-l", "kubevirt.io=virt-launcher", "-o", "name").stdout
    assert "virt-launcher-life-" in pods
    # No CPU request: 1 vCPU / KubeVirt's allocation ratio 10 = 100m, weighted as the kubelet weighs 100m
    # (102 cpu.shares in a cgroup under the node's), so booting guests cannot starve the node agent.
    node_dir = cluster.data_dir / "nodes" / vmi["status"]["nodeName"]
    rel = cpu_cgroup(int((node_dir / "runtime" / "default_life" / "pid").read_text()))
    assert rel.startswith("/virtplane/virtplane-node-") and rel.endswith("/default_life"), rel
    assert cpu_weight(rel) == ("102" if V1 else "4")
    # The control plane (here the node agent) sits beside the VMs with 8x the host's cores as its reserve, so
    # booting guests cannot starve the agent that reports them Running.
    assert cpu_cgroup(int((node_dir / "agent.pid").read_text())) == "/virtplane-system"
    shares = 8 * 1024 * (os.cpu_count() or 1)
    assert cpu_weight("/virtplane-system") == (str(shares) if V1 else str(1 + (shares - 2) * 9999 // 262142))
    metrics = cluster.get_raw("/metrics").decode()
    assert re.search(r'kubevirt_vmi_phase_count\{node="virtplane-node-\d+",phase="running"[^}]*\} [1-9]', metrics)


def test_pause_stops_the_guest_and_unpause_resumes_it(cluster: Cluster, image: str) -> None:
    wait_for(lambda: len(ticks(console(cluster, "life"))) >= 2, 120, what="life ticking")
    virtctl(cluster, "pause", "vmi", "life")
    wait_for(lambda: any(c["type"] == "Paused" and c["status"] == "True"
                         for c in (get(cluster, "vmi", "life") or {}).get("status", {}).get("conditions", [])),
             30, what="Paused condition")
    assert (get(cluster, "vm", "life") or {})["status"]["printableStatus"] in ("Paused", "Running")
    frozen = ticks(console(cluster, "life"))
    time.sleep(3)  # the guest is paused: nothing may happen in it for any length of time
    assert ticks(console(cluster, "life")) == frozen
    virtctl(cluster, "unpause", "vmi", "life")
    wait_for(lambda: last_tick(cluster, "life") > frozen[-1], 30, what="ticks after unpause")
    after = ticks(console(cluster, "life"))
    assert after[len(frozen)] == frozen[-1] + 1  # the same guest carried on: no reboot


def test_node_agent_kill_does_not_touch_the_vm(cluster: Cluster, image: str) -> None:
    before = get(cluster, "vmi", "life")
    assert before is not None
    node = before["status"]["nodeName"]
    pid_file = cluster.data_dir / "nodes" / node / "agent.pid"
    old_pid = int(pid_file.read_text())
    seen = ticks(console(cluster, "life"))
    os.kill(old_pid, signal.SIGKILL)  # as a node agent crash would
    wait_for(lambda: int(pid_file.read_text()) != old_pid, 30, what="agent restarted by up")
    wait_for(lambda: last_tick(cluster, "life") > seen[-1] + 2, 60, what="ticks after agent restart")
    text = console(cluster, "life")
    assert text.count("virtplane-guest: booted") == 1  # never rebooted
    nums = ticks(text)
    assert nums == list(range(nums[0], nums[0] + len(nums)))  # the count never reset or skipped back
    after = get(cluster, "vmi", "life")
    assert after is not None and after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["status"]["phase"] == "Running"


def test_stop_start_restart_with_virtctl(cluster: Cluster, image: str) -> None:
    uid = (get(cluster, "vmi", "life") or {})["metadata"]["uid"]
    virtctl(cluster, "restart", "life")
    wait_for(lambda: (v := get(cluster, "vmi", "life")) and v["metadata"]["uid"] != uid
             and v.get("status", {}).get("phase") == "Running", 120, what="restarted VMI")

    virtctl(cluster, "stop", "life")
    wait_for(lambda: get(cluster, "vmi", "life") is None, 90, what="VMI gone after stop")
    vm = wait_for(lambda: (v := get(cluster, "vm", "life")) and v["status"].get("printableStatus") == "Stopped"
                  and v, 30, what="Stopped")
    assert vm["spec"]["runStrategy"] == "Halted"
    out = virtctl(cluster, "stop", "life", check=False)
    assert out.returncode != 0 and "not running" in (out.stdout + out.stderr)

    virtctl(cluster, "start", "life")
    wait_running_and_booted(cluster, "life")
    assert (get(cluster, "vm", "life") or {})["spec"]["runStrategy"] == "Always"


def test_crashed_qemu_fails_the_vmi_and_always_restarts_it(cluster: Cluster, image: str) -> None:
    vmi = wait_running_and_booted(cluster, "life")
    node = vmi["status"]["nodeName"]
    pid = int((cluster.data_dir / "nodes" / node / "runtime" / "default_life" / "pid").read_text())
    os.kill(pid, signal.SIGKILL)  # the VM's QEMU dies, as on an OOM kill
    events = wait_for(lambda: "crashed" in (out := cluster.kubectl(
        "get", "events", "--field-selector", "involvedObject.name=life", "-o", "json").stdout) and out, 60)
    assert "SIGKILL" in events or "signal" in events
    wait_for(lambda: (v := get(cluster, "vmi", "life")) and v["metadata"]["uid"] != vmi["metadata"]["uid"]
             and v.get("status", {}).get("phase") == "Running", 120, what="VM restarted by runStrategy Always")
    cluster.kubectl("delete", "vm", "life", "--timeout=120s")
    wait_for(lambda: get(cluster, "vmi", "life") is None, 90, what="VMI deleted with its VM")


def test_vmi_with_sata_disks_boots(cluster: Cluster, image: str) -> None:
    manifest = yaml.safe_load(vm_manifest("sata", image, disk_bus="sata"))
    vmi = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "metadata": {"name": "sata"},
           "spec": manifest["spec"]["template"]["spec"]}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(vmi))
    got = wait_running_and_booted(cluster, "sata")
    assert [d["disk"]["bus"] for d in got["spec"]["domain"]["devices"]["disks"]] == ["sata", "sata"]
    wait_for(lambda: "cloud-init says hello from sata" in console(cluster, "sata"), 60, what="cloud-init")
    cluster.kubectl("delete", "vmi", "sata", "--timeout=120s")


def test_vm_that_fits_no_node_is_error_unschedulable(cluster: Cluster, image: str) -> None:
    cluster.kubectl("apply", "-f", "-", input=vm_manifest("too-big", image, memory="500Gi"))
    wait_for(lambda: ((get(cluster, "vm", "too-big") or {}).get("status") or {}).get("printableStatus")
             == "ErrorUnschedulable", 60, what="ErrorUnschedulable")
    events = cluster.kubectl("get", "events", "-o", "json").stdout
    failed = [e for e in json.loads(events)["items"] if e["reason"] == "FailedScheduling"]
    assert failed and "Insufficient memory" in failed[-1]["message"]
    cluster.kubectl("delete", "vm", "too-big", "--timeout=60s")

