"""Instance types and preferences through `virtplane up`, as a KubeVirt user meets them: the common cluster
instance types and preferences are there from the start; `virtctl create vm --instancetype --preference` gives
a VM whose VMI carries the instance type's CPUs and memory and the preference's devices; the captured
ControllerRevision is referenced from the VM's status; conflicts and missing instance types are refused in
KubeVirt's words."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from virtplane.testing.cluster import Cluster

from .test_lifecycle import get, image, virtctl, wait_for, wait_running_and_booted  # noqa: F401 - fixture

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", autouse=True)
def cleanup(cluster: Cluster) -> Iterator[None]:
    yield
    cluster.kubectl("delete", "vm", "it-small", "it-missing", "--ignore-not-found", "--timeout=90s", check=False)


def jsonpath(cluster: Cluster, kind: str, name: str, path: str) -> str:
    return cluster.kubectl("get", kind, name, "-o", f"jsonpath={path}").stdout


def test_common_instancetypes_and_preferences_are_created_at_start(cluster: Cluster) -> None:
    out = cluster.kubectl("get", "virtualmachineclusterinstancetypes", "-o", "name").stdout.split()
    for name in ("u1.nano", "u1.small", "u1.medium", "u1.large", "o1.small", "cx1.medium"):
        assert f"virtualmachineclusterinstancetype.instancetype.kubevirt.io/{name}" in out
    assert jsonpath(cluster, "vmcf", "u1.medium", "{.spec.cpu.guest} {.spec.memory.guest}") == "1 4Gi"
    prefs = cluster.kubectl("get", "vmcps", "-o", "name").stdout.split()
    for name in ("fedora", "ubuntu", "centos.stream9", "rhel.9", "windows.11"):
        assert f"virtualmachineclusterpreference.instancetype.kubevirt.io/{name}" in prefs


def test_vm_with_u1_small_boots_with_its_cpu_memory_and_preference(cluster: Cluster, image: str) -> None:  # noqa: F811
    manifest = virtctl(cluster, "create", "vm", "--name", "it-small", "--instancetype", "u1.small",
                       "--preference", "fedora", "--volume-containerdisk", f"src:{image},name:root").stdout
    cluster.kubectl("apply", "-f", "-", input=manifest)
    vmi = wait_running_and_booted(cluster, "it-small", timeout=180)
    domain = vmi["spec"]["domain"]
    assert domain["memory"]["guest"] == "2Gi"
    assert (domain["cpu"]["sockets"], domain["cpu"]["cores"], domain["cpu"]["threads"]) == (1, 1, 1)
    assert jsonpath(cluster, "vmi", "it-small", "{.spec.domain.memory.guest}") == "2Gi"
    assert jsonpath(cluster, "vmi", "it-small", "{.spec.domain.resources.requests.memory}") == "2Gi"
    assert vmi["metadata"]["annotations"]["kubevirt.io/cluster-instancetype-name"] == "u1.small"
    assert vmi["metadata"]["annotations"]["kubevirt.io/cluster-preference-name"] == "fedora"
    # the preference's devices: virtio disk bus (left unset by virtctl), virtio NIC model, an RNG
    assert domain["devices"]["disks"][0]["disk"]["bus"] == "virtio"
    assert domain["devices"]["rng"] == {}
    # the captured ControllerRevision, owned by the VM
    vm = get(cluster, "vm", "it-small")
    assert vm is not None
    ref = vm["status"]["instancetypeRef"]
    assert ref["name"] == "u1.small" and ref["kind"] == "VirtualMachineClusterInstancetype"
    rev = json.loads(cluster.kubectl("get", "controllerrevision", ref["controllerRevisionRef"]["name"],
                                     "-o", "json").stdout)
    assert rev["data"]["spec"] == {"cpu": {"guest": 1}, "memory": {"guest": "2Gi"}}
    assert rev["metadata"]["ownerReferences"][0]["uid"] == vm["metadata"]["uid"]
    assert vm["status"]["preferenceRef"]["controllerRevisionRef"]["name"].startswith("it-small-fedora-v1beta1-")


def test_cpu_or_memory_beside_an_instancetype_is_refused(cluster: Cluster, image: str) -> None:  # noqa: F811
    vm = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "it-conflict"},
          "spec": {"runStrategy": "Halted", "instancetype": {"name": "u1.small"}, "template": {"spec": {
              "domain": {"cpu": {"cores": 2}, "resources": {"requests": {"memory": "1Gi"}}, "devices": {}},
              "volumes": [{"name": "root", "containerDisk": {"image": image}}]}}}}
    proc = cluster.kubectl("apply", "-f", "-", input=json.dumps(vm), check=False)
    assert proc.returncode != 0
    assert ("VM field(s) spec.template.spec.domain.cpu.cores, spec.template.spec.domain.resources.requests.memory "
            "conflicts with selected instance type") in proc.stderr


def test_missing_instancetype_is_reported_on_the_vm(cluster: Cluster, image: str) -> None:  # noqa: F811
    manifest = virtctl(cluster, "create", "vm", "--name", "it-missing", "--instancetype", "no.such",
                       "--volume-containerdisk", f"src:{image},name:root").stdout
    cluster.kubectl("apply", "-f", "-", input=manifest)

    def failure() -> dict | None:
        vm = get(cluster, "vm", "it-missing") or {}
        return next((c for c in (vm.get("status") or {}).get("conditions") or [] if c.get("type") == "Failure"),
                    None)

    cond = wait_for(failure, 60, what="Failure condition")
    assert cond["reason"] == "FailedFindInstancetype"
    assert '"no.such" not found' in cond["message"]
    assert get(cluster, "vmi", "it-missing") is None
