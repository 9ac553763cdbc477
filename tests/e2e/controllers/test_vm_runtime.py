"""The control-plane half of running VMs, against a real `virtplane up --nodes 0` and real kubectl.

No node agent runs: each test registers Node objects itself, as an agent would (capacity, allocatable, Ready,
`kubevirt.io/schedulable=true`), so VMIs get as far as Scheduled and no further. That is the whole
control-plane path: VM -> VMI (owner reference) -> virt-launcher pod -> scheduler binding -> Scheduled.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from virtplane.testing.cluster import Cluster

pytestmark = pytest.mark.e2e
JSON = dict[str, Any]
T = TypeVar("T")
SUB = "/apis/subresources.kubevirt.io/v1/namespaces/default/virtualmachines"
CIRROS = "quay.io/kubevirt/cirros-container-disk-demo"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A clean cluster per test (nodes are cluster-wide state), without node agents."""
    c = Cluster(tmp_path / "cluster", extra_args=("--nodes", "0"))
    c.start()
    yield c
    c.stop()


def wait_for(fn: Callable[[], T | None], what: str, timeout: float = 20.0, cluster: Cluster | None = None) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.1)
    tail = cluster.log_tail(3000) if cluster else ""
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})\n{tail}")


def get(c: Cluster, kind: str, name: str = "", *, ns: str = "default") -> Any:
    args = ["get", kind, *([name] if name else []), "-o", "json"]
    if kind not in ("node", "nodes"):
        args += ["-n", ns]
    proc = c.kubectl(*args, check=False)
    if proc.returncode != 0:
        if "NotFound" in proc.stderr or "not found" in proc.stderr:
            return None
        raise AssertionError(proc.stderr)
    return json.loads(proc.stdout)


def register_node(c: Cluster, name: str, *, cpu: str = "4", memory: str = "4Gi", pods: str = "110",
                  labels: dict[str, str] | None = None, ready: bool = True) -> None:
    node = {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubevirt.io/schedulable": "true",
                                              **(labels or {})}},
        "status": {
            "capacity": {"cpu": cpu, "memory": memory, "pods": pods},
            "allocatable": {"cpu": cpu, "memory": memory, "pods": pods},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False", "reason": "KubeletReady",
                            "message": "virtplane node agent is posting ready status"}],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
        },
    }
    c.kubectl("create", "-f", "-", input=json.dumps(node))


def vm_manifest(name: str, *, strategy: str = "Always", memory: str = "128Mi", extra_spec: JSON | None = None) -> str:
    vm = {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {
            "runStrategy": strategy,
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}],
                                           "interfaces": [{"name": "default", "masquerade": {}}]},
                               "resources": {"requests": {"memory": memory}}},
                    "networks": [{"name": "default", "pod": {}}],
                    "volumes": [{"name": "root", "containerDisk": {"image": CIRROS}}],
                    **(extra_spec or {}),
                },
            },
        },
    }
    return json.dumps(vm)


def launcher_pods(c: Cluster, vmi_uid: str) -> list[JSON]:
    pods = get(c, "pods")["items"]
    return [p for p in pods if p["metadata"].get("labels", {}).get("kubevirt.io/created-by") == vmi_uid]


def vm_status(c: Cluster, name: str) -> JSON:
    vm = get(c, "vm", name)
    return (vm or {}).get("status") or {}


def events_text(c: Cluster) -> str:
    return c.kubectl("get", "events", "-n", "default", "-o", "wide").stdout


def condition(obj: JSON | None, ctype: str) -> JSON | None:
    return next((x for x in ((obj or {}).get("status") or {}).get("conditions") or [] if x["type"] == ctype), None)


def subresource(c: Cluster, vm: str, action: str) -> None:
    c.kubectl("replace", "--raw", f"{SUB}/{vm}/{action}", "-f", "-", input="{}")


# ------------------------------------------------------------------------------------------- tests


def test_vm_always_goes_to_scheduled_and_halted_stops_it(cluster: Cluster) -> None:
    c = cluster
    register_node(c, "node-a")
    c.kubectl("apply", "-f", "-", input=vm_manifest("vm-a"))
    vm = get(c, "vm", "vm-a")

    vmi = wait_for(lambda: get(c, "vmi", "vm-a"), "the VMI", cluster=c)
    ref = vmi["metadata"]["ownerReferences"][0]
    assert (ref["kind"], ref["name"], ref["uid"], ref["controller"], ref["blockOwnerDeletion"]) == \
        ("VirtualMachine", "vm-a", vm["metadata"]["uid"], True, True)
    assert vmi["metadata"]["labels"]["kubevirt.io/vm"] == "vm-a" and vmi["metadata"]["labels"]["app"] == "vm-a"
    assert "foregroundDeleteVirtualMachine" in wait_for(
        lambda: get(c, "vmi", "vm-a")["metadata"].get("finalizers"), "the VMI finalizer", cluster=c)

    uid = vmi["metadata"]["uid"]
    pod = wait_for(lambda: next(iter(launcher_pods(c, uid)), None), "the launcher pod", cluster=c)
    assert pod["metadata"]["name"].startswith("virt-launcher-vm-a-")
    assert pod["metadata"]["labels"]["kubevirt.io"] == "virt-launcher"
    assert pod["metadata"]["labels"]["vm.kubevirt.io/name"] == "vm-a"
    assert pod["metadata"]["annotations"]["kubevirt.io/domain"] == "vm-a"
    assert pod["metadata"]["ownerReferences"][0]["uid"] == uid
    assert pod["spec"]["containers"][0]["resources"]["requests"] == {"memory": "192Mi", "cpu": "100m"}

    bound = wait_for(lambda: next((p for p in launcher_pods(c, uid) if p["spec"].get("nodeName")), None),
                     "the scheduler's binding", cluster=c)
    assert bound["spec"]["nodeName"] == "node-a"
    assert condition(bound, "PodScheduled")["status"] == "True"  # type: ignore[index]

    vmi = wait_for(lambda: (v := get(c, "vmi", "vm-a")) and v["status"].get("phase") == "Scheduled" and v,
                   "VMI Scheduled", cluster=c)
    assert vmi["status"]["nodeName"] == "node-a" and vmi["metadata"]["labels"]["kubevirt.io/nodeName"] == "node-a"
    assert [t["phase"] for t in vmi["status"]["phaseTransitionTimestamps"]] == ["Pending", "Scheduling", "Scheduled"]
    assert condition(vmi, "LiveMigratable")["status"] == "True"  # type: ignore[index]
    assert vmi["status"]["qosClass"] == "Burstable"

    st = wait_for(lambda: (s := vm_status(c, "vm-a")).get("created") and s, "VM status", cluster=c)
    assert st["printableStatus"] == "Starting" and st["ready"] is False
    assert st["observedGeneration"] == st["desiredGeneration"] == 1
    table = c.kubectl("get", "vm", "vm-a").stdout
    assert "Starting" in table

    text = wait_for(lambda: (t := events_text(c)) and "Scheduled" in t and t, "events", cluster=c)
    assert "Started the virtual machine by creating the new virtual machine instance vm-a" in text
    assert "Created virtual machine pod virt-launcher-vm-a-" in text
    assert "Successfully assigned default/virt-launcher-vm-a-" in text

    # Halted: the VMI is deleted; no node agent ever ran it, so the controller finishes the teardown.
    c.kubectl("patch", "vm", "vm-a", "--type", "merge", "-p", '{"spec":{"runStrategy":"Halted"}}')
    wait_for(lambda: get(c, "vmi", "vm-a") is None, "the VMI to go away", cluster=c)
    assert launcher_pods(c, uid) == []
    st = wait_for(lambda: (s := vm_status(c, "vm-a")).get("printableStatus") == "Stopped" and s, "Stopped",
                  cluster=c)
    assert st["created"] is False and st["ready"] is False
    assert "Stopped the virtual machine by deleting the virtual machine instance" in events_text(c)

    # Deleting the VM: its finalizer goes once there is no VMI.
    c.kubectl("delete", "vm", "vm-a", "--timeout=30s")
    assert get(c, "vm", "vm-a") is None


def test_vmi_on_a_node_with_a_live_agent_waits_for_it(cluster: Cluster) -> None:
    """Once Scheduled, teardown is the node agent's: the finalizer stays while the node's Lease is fresh."""
    c = cluster
    register_node(c, "node-l")
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
             "metadata": {"name": "node-l", "namespace": "kube-node-lease"},
             "spec": {"holderIdentity": "node-l", "leaseDurationSeconds": 40, "renewTime": now}}
    c.kubectl("create", "namespace", "kube-node-lease", check=False)
    c.kubectl("create", "-f", "-", input=json.dumps(lease))
    c.kubectl("apply", "-f", "-", input=vm_manifest("vm-l"))
    wait_for(lambda: (v := get(c, "vmi", "vm-l")) and v["status"].get("phase") == "Scheduled", "Scheduled",
             cluster=c)
    c.kubectl("patch", "vm", "vm-l", "--type", "merge", "-p", '{"spec":{"runStrategy":"Halted"}}')
    wait_for(lambda: (v := get(c, "vmi", "vm-l")) and v["metadata"].get("deletionTimestamp"), "deletion", cluster=c)
    time.sleep(2)
    vmi = get(c, "vmi", "vm-l")
    assert vmi is not None and "foregroundDeleteVirtualMachine" in vmi["metadata"]["finalizers"]
    assert launcher_pods(c, vmi["metadata"]["uid"])  # the agent's pod is left alone
    assert vm_status(c, "vm-l")["printableStatus"] == "Stopping"
    # The agent goes away (its Lease with it): the VMI never ran, so the controller takes over.
    c.kubectl("delete", "lease", "node-l", "-n", "kube-node-lease")
    wait_for(lambda: get(c, "vmi", "vm-l") is None, "takeover", cluster=c)
    wait_for(lambda: vm_status(c, "vm-l").get("printableStatus") == "Stopped", "Stopped", cluster=c)


def test_vm_larger_than_any_node_is_unschedulable_until_a_node_fits(cluster: Cluster) -> None:
    c = cluster
    register_node(c, "small", memory="1Gi")
    c.kubectl("apply", "-f", "-", input=vm_manifest("vm-big", memory="2Gi"))
    st = wait_for(lambda: (s := vm_status(c, "vm-big")).get("printableStatus") == "ErrorUnschedulable" and s,
                  "ErrorUnschedulable", cluster=c)
    assert st["created"] is True
    vmi = get(c, "vmi", "vm-big")
    cond = condition(vmi, "PodScheduled")
    assert cond is not None and (cond["status"], cond["reason"]) == ("False", "Unschedulable")
    assert cond["message"] == "0/1 nodes are available: 1 Insufficient memory."
    assert vmi["status"]["phase"] == "Scheduling"
    assert "ErrorUnschedulable" in c.kubectl("get", "vm", "vm-big").stdout
    text = wait_for(lambda: (t := events_text(c)) and "FailedScheduling" in t and t, "FailedScheduling", cluster=c)
    line = next(x for x in text.splitlines() if "FailedScheduling" in x)
    assert "Warning" in line and "0/1 nodes are available: 1 Insufficient memory." in line
    assert "pod/virt-launcher-vm-big-" in line

    register_node(c, "large", memory="8Gi")  # a new node is an event: the pending pod is retried at once
    vmi = wait_for(lambda: (v := get(c, "vmi", "vm-big")) and v["status"].get("phase") == "Scheduled" and v,
                   "Scheduled on the new node", timeout=10, cluster=c)
    assert vmi["status"]["nodeName"] == "large" and condition(vmi, "PodScheduled") is None
    wait_for(lambda: vm_status(c, "vm-big").get("printableStatus") == "Starting", "Starting", cluster=c)


def test_cordoned_node_keeps_new_pods_pending(cluster: Cluster) -> None:
    c = cluster
    register_node(c, "node-c")
    c.kubectl("cordon", "node-c")
    c.kubectl("apply", "-f", "-", input=vm_manifest("vm-c"))
    vmi = wait_for(lambda: (v := get(c, "vmi", "vm-c")) and condition(v, "PodScheduled") and v, "unschedulable",
                   cluster=c)
    assert condition(vmi, "PodScheduled")["message"] == \
        "0/1 nodes are available: 1 node(s) were unschedulable."  # type: ignore[index]
    pods = launcher_pods(c, vmi["metadata"]["uid"])
    assert len(pods) == 1 and not pods[0]["spec"].get("nodeName")
    assert "Pending" in c.kubectl("get", "pods").stdout
    c.kubectl("uncordon", "node-c")
    wait_for(lambda: get(c, "vmi", "vm-c")["status"].get("phase") == "Scheduled", "scheduled after uncordon",
             timeout=10, cluster=c)


def test_taints_and_tolerations(cluster: Cluster) -> None:
    c = cluster
    register_node(c, "node-t", labels={"tier": "vms"})
    c.kubectl("taint", "nodes", "node-t", "dedicated=vms:NoSchedule")
    c.kubectl("apply", "-f", "-", input=vm_manifest("vm-plain"))
    tolerating = vm_manifest("vm-tolerant", extra_spec={
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "vms", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["vms"]}]}]}}},
    })
    c.kubectl("apply", "-f", "-", input=tolerating)
    wait_for(lambda: (v := get(c, "vmi", "vm-tolerant")) and v["status"].get("phase") == "Scheduled",
             "the tolerating VM scheduled", cluster=c)
    plain = wait_for(lambda: (v := get(c, "vmi", "vm-plain")) and condition(v, "PodScheduled") and v,
                     "the plain VM unschedulable", cluster=c)
    assert condition(plain, "PodScheduled")["message"] == (  # type: ignore[index]
        "0/1 nodes are available: 1 node(s) had untolerated taint {dedicated: vms}.")
    pod = launcher_pods(c, get(c, "vmi", "vm-tolerant")["metadata"]["uid"])[0]
    assert pod["spec"]["tolerations"][0]["key"] == "dedicated"  # copied from the VMI
    c.kubectl("taint", "nodes", "node-t", "dedicated=vms:NoSchedule-")
    wait_for(lambda: get(c, "vmi", "vm-plain")["status"].get("phase") == "Scheduled", "untainted", timeout=10,
             cluster=c)


def test_manual_start_stop_and_restart_through_subresources(cluster: Cluster) -> None:
    c = cluster
    register_node(c, "node-m")
    c.kubectl("apply", "-f", "-", input=vm_manifest("vm-m", strategy="Manual"))
    wait_for(lambda: vm_status(c, "vm-m").get("printableStatus") == "Stopped", "Stopped", cluster=c)
    assert get(c, "vmi", "vm-m") is None

    subresource(c, "vm-m", "start")
    first = wait_for(lambda: (v := get(c, "vmi", "vm-m")) and v["status"].get("phase") == "Scheduled" and v,
                     "started", cluster=c)
    wait_for(lambda: not vm_status(c, "vm-m").get("stateChangeRequests"), "the Start request trimmed", cluster=c)

    subresource(c, "vm-m", "restart")
    second = wait_for(lambda: (v := get(c, "vmi", "vm-m")) and v["metadata"]["uid"] != first["metadata"]["uid"]
                      and v, "a new VMI", cluster=c)
    assert second["metadata"]["ownerReferences"][0]["name"] == "vm-m"
    wait_for(lambda: not vm_status(c, "vm-m").get("stateChangeRequests"), "requests done", cluster=c)

    subresource(c, "vm-m", "stop")
    wait_for(lambda: get(c, "vmi", "vm-m") is None, "stopped", cluster=c)
    st = wait_for(lambda: (s := vm_status(c, "vm-m")).get("printableStatus") == "Stopped" and s, "Stopped",
                  cluster=c)
    assert st["runStrategy"] == "Manual" and not st.get("stateChangeRequests")


def test_template_changes_while_running(cluster: Cluster) -> None:
    c = cluster
    register_node(c, "node-r", labels={"zone": "a"})
    c.kubectl("apply", "-f", "-", input=vm_manifest("vm-r"))
    wait_for(lambda: (v := get(c, "vmi", "vm-r")) and v["status"].get("phase") == "Scheduled", "Scheduled",
             cluster=c)
    # scheduling constraints follow the VMI live (KubeVirt's LiveUpdate rollout)
    c.kubectl("patch", "vm", "vm-r", "--type", "merge", "-p",
              '{"spec":{"template":{"spec":{"nodeSelector":{"zone":"a"}}}}}')
    wait_for(lambda: get(c, "vmi", "vm-r")["spec"].get("nodeSelector") == {"zone": "a"}, "live nodeSelector",
             cluster=c)
    st = wait_for(lambda: (s := vm_status(c, "vm-r")).get("observedGeneration") == 2 and s, "generation 2",
                  cluster=c)
    assert st["desiredGeneration"] == 2 and condition({"status": st}, "RestartRequired") is None
    # a new memory size needs a restart
    c.kubectl("patch", "vm", "vm-r", "--type", "merge", "-p",
              '{"spec":{"template":{"spec":{"domain":{"resources":{"requests":{"memory":"256Mi"}}}}}}}')
    st = wait_for(lambda: (s := vm_status(c, "vm-r")) and condition({"status": s}, "RestartRequired") and s,
                  "RestartRequired", cluster=c)
    assert st["desiredGeneration"] == 3 and st["observedGeneration"] == 2
    assert condition({"status": st}, "RestartRequired")["message"] == \
        "a non-live-updatable field was changed in the template spec"  # type: ignore[index]


def test_a_vmi_that_fails_before_running_backs_off(cluster: Cluster) -> None:
    """Crash loop: the launcher pod vanishes before the VMI ever runs; the VM waits KubeVirt's backoff."""
    c = cluster  # no node at all: the pod stays pending, then we take it away
    c.kubectl("apply", "-f", "-", input=vm_manifest("vm-crash"))
    vmi = wait_for(lambda: (v := get(c, "vmi", "vm-crash")) and v["status"].get("phase") == "Scheduling" and v,
                   "Scheduling", cluster=c)
    assert condition(vmi, "PodScheduled")  # "no nodes available to schedule pods"
    wait_for(lambda: vm_status(c, "vm-crash").get("printableStatus") == "ErrorUnschedulable", "unschedulable",
             cluster=c)
    pod = launcher_pods(c, vmi["metadata"]["uid"])[0]
    c.kubectl("delete", "pod", pod["metadata"]["name"])
    st = wait_for(lambda: (s := vm_status(c, "vm-crash")).get("printableStatus") == "CrashLoopBackOff" and s,
                  "CrashLoopBackOff", cluster=c)
    failure = st["startFailure"]
    assert failure["consecutiveFailCount"] == 1 and failure["lastFailedVMIUID"] == vmi["metadata"]["uid"]
    assert get(c, "vmi", "vm-crash") is None  # removed; the next one waits for retryAfterTimestamp
    again = wait_for(lambda: (v := get(c, "vmi", "vm-crash")) and v, "the next attempt", timeout=25, cluster=c)
    assert again["metadata"]["uid"] != vmi["metadata"]["uid"]


def test_a_vmi_deleted_before_it_was_scheduled_goes_at_once(cluster: Cluster) -> None:
    """Never handed to a node agent: the VMI controller deletes the pending pod and drops its finalizer."""
    c = cluster
    register_node(c, "tiny", memory="512Mi")
    c.kubectl("apply", "-f", "-", input=vm_manifest("vm-pending", memory="1Gi"))
    vmi = wait_for(lambda: (v := get(c, "vmi", "vm-pending")) and condition(v, "PodScheduled") and v,
                   "unschedulable", cluster=c)
    assert len(launcher_pods(c, vmi["metadata"]["uid"])) == 1
    # A user deletes it; the VM makes a new one of the same name (after KubeVirt's start backoff: a VMI that
    # ended without running counts as a failed start). Not `kubectl delete`'s own wait: with a fast control
    # plane the replacement can exist before kubectl starts waiting, which that wait does not always see through.
    c.kubectl("delete", "vmi", "vm-pending", "--wait=false")
    wait_for(lambda: (v := get(c, "vmi", "vm-pending")) and v["metadata"]["uid"] != vmi["metadata"]["uid"],
             "the replacement VMI", timeout=30, cluster=c)
    assert launcher_pods(c, vmi["metadata"]["uid"]) == []
    text = events_text(c)
    assert "Deleted virtual machine pod virt-launcher-vm-pending-" in text
    c.kubectl("delete", "vm", "vm-pending", "--timeout=20s")  # Terminating -> the VMI goes -> the VM goes
    assert get(c, "vm", "vm-pending") is None and get(c, "vmi", "vm-pending") is None
