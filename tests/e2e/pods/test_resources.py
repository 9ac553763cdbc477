"""Container resources in the kernel, as the kubelet sets them: the CPU request as cgroup CPU weight (cpu.shares,
1024 a core; 2 without a request), the CPU limit as a CFS quota, the memory limit as the memory cgroup's limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .conftest import PodEnv, ready

V1 = Path("/sys/fs/cgroup")


def cgroup_file(pid: int, controller: str, name: str) -> str:
    """A cgroup v1 file of the process's `controller` cgroup (this machine mounts each controller apart);
    name ".." gives the parent cgroup's path."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        if controller in controllers.split(","):
            if name == "..":
                return str(Path(rel).parent)
            return (V1 / controllers / rel.lstrip("/") / name).read_text().strip()
    raise AssertionError(f"pid {pid} has no {controller} cgroup")


def test_requests_weigh_and_limits_cap(env: PodEnv) -> None:
    if not (V1 / "cpu" / "cpu.shares").exists():
        pytest.skip("this test reads cgroup v1 files (cpu.shares, cpu.cfs_quota_us)")
    env.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: sized}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: weighed
    image: {env.image}
    command: ["sleep", "3600"]
    resources:
      requests: {{cpu: 250m, memory: 32Mi}}
      limits: {{cpu: 500m, memory: 64Mi}}
  - name: besteffort
    image: {env.image}
    command: ["sleep", "3600"]
""")
    pod = env.wait_pod("sized", ready, what="Ready")
    uid = pod["metadata"]["uid"]

    def pid(name: str) -> int:
        return int((env.node_dir / "pods" / "sandboxes" / uid / "containers" / name / "state" / "pid").read_text())

    weighed, besteffort = pid("weighed"), pid("besteffort")
    assert cgroup_file(weighed, "cpu", "cpu.shares") == "256"
    assert cgroup_file(weighed, "cpu", "cpu.cfs_period_us") == "100000"
    assert cgroup_file(weighed, "cpu", "cpu.cfs_quota_us") == "50000"
    assert cgroup_file(weighed, "memory", "memory.limit_in_bytes") == str(64 << 20)
    assert cgroup_file(besteffort, "cpu", "cpu.shares") == "2"
    # both sit in the pod's cgroup (the kubelet's kubepods/pod<uid>), weighing the pod's summed requests; not
    # every container has limits, so the pod is not capped
    pod_cg = cgroup_file(weighed, "cpu", "..")
    assert pod_cg.endswith(f"-pod{uid}") and pod_cg == cgroup_file(besteffort, "cpu", "..")
    assert pod_cg == cgroup_file(weighed, "memory", "..")
    assert cgroup_file(weighed, "cpu", "../cpu.shares") == "256"
    assert cgroup_file(weighed, "cpu", "../cpu.cfs_quota_us") == "-1"
    assert int(cgroup_file(weighed, "memory", "../memory.limit_in_bytes")) > 1 << 40
    # the pods sit under the node's pods parent, which weighs the host's cores beside the VMs' (as kubepods
    # does): 2 shares make a BestEffort container yield to other pods, not to every busy process of the host
    parent = str(Path(pod_cg).parent)
    assert parent.startswith("/virtplane/pods-")
    assert (V1 / "cpu" / parent.lstrip("/") / "cpu.shares").read_text().strip() == str(1024 * (os.cpu_count() or 1))
    assert cgroup_file(besteffort, "cpu", "cpu.cfs_quota_us") == "-1"
    env.kubectl("delete", "pod", "sized", "--wait=true")
    assert not (V1 / "cpu" / pod_cg.lstrip("/")).exists()  # the pod's cgroup goes with the pod
    assert not (V1 / "memory" / pod_cg.lstrip("/")).exists()


def test_a_pod_whose_containers_all_have_limits_is_capped_as_a_whole(env: PodEnv) -> None:
    if not (V1 / "cpu" / "cpu.shares").exists():
        pytest.skip("this test reads cgroup v1 files (cpu.shares, cpu.cfs_quota_us)")
    capped = "resources: {requests: {cpu: 100m}, limits: {cpu: 200m, memory: 32Mi}}"
    env.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: capped}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {{name: a, image: {env.image}, command: ["sleep", "3600"], {capped}}}
  - {{name: b, image: {env.image}, command: ["sleep", "3600"], {capped}}}
""")
    pod = env.wait_pod("capped", ready, what="Ready")
    a = int((env.node_dir / "pods" / "sandboxes" / pod["metadata"]["uid"] / "containers" / "a" / "state" / "pid")
            .read_text())  # fmt: skip
    assert cgroup_file(a, "cpu", "cpu.cfs_quota_us") == "20000"  # the container's own cap
    assert cgroup_file(a, "cpu", "../cpu.shares") == "204"  # 200m of requests
    assert cgroup_file(a, "cpu", "../cpu.cfs_quota_us") == "40000"  # 400m for the pod
    assert cgroup_file(a, "memory", "../memory.limit_in_bytes") == str(64 << 20)
    env.kubectl("delete", "pod", "capped", "--wait=true")
