"""The default scheduler's pure logic: filters, scores and kube-scheduler's messages."""

from __future__ import annotations

from typing import Any

import pytest

from virtplane.api import patch
from virtplane.controllers import scheduler as s

JSON = dict[str, Any]
GI = 2**30
MI = 2**20


def node(name: str, *, cpu: str = "4", memory: str = "8Gi", pods: str = "110", ready: str = "True",
         labels: dict[str, str] | None = None, taints: list[JSON] | None = None,
         unschedulable: bool = False) -> JSON:
    spec: JSON = {}
    if taints:
        spec["taints"] = taints
    if unschedulable:
        spec["unschedulable"] = True
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubevirt.io/schedulable": "true",
                                              **(labels or {})}},
        "spec": spec,
        "status": {"allocatable": {"cpu": cpu, "memory": memory, "pods": pods},
                   "conditions": [{"type": "Ready", "status": ready}]},
    }


def pod(name: str = "p", *, cpu: str | None = None, memory: str | None = None, node_name: str = "",
        phase: str = "Pending", launcher: bool = False, **spec: Any) -> JSON:
    requests = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v}
    p: JSON = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"kubevirt.io": "virt-launcher"} if launcher else {}},
        "spec": {"containers": [{"name": "c", "resources": {"requests": requests} if requests else {}}], **spec},
        "status": {"phase": phase},
    }
    if node_name:
        p["spec"]["nodeName"] = node_name
    return p


def reasons(p: JSON, n: JSON, used: s.NodeUsage | None = None) -> list[str]:
    return s.filter_node(p, n, used)


# ------------------------------------------------------------------------------------------- requests


def test_pod_requests_sum_containers_max_init_and_overhead() -> None:
    p = pod(cpu="250m", memory="128Mi")
    p["spec"]["containers"].append({"name": "d", "resources": {"requests": {"cpu": "0.5", "memory": "64Mi"}}})
    p["spec"]["initContainers"] = [{"name": "i", "resources": {"requests": {"cpu": "2", "memory": "1Mi"}}}]
    p["spec"]["overhead"] = {"memory": "10Mi"}
    assert s.pod_requests(p) == {"cpu": 2000, "memory": 192 * MI + 10 * MI}


def test_usage_counts_bound_non_terminal_pods_only() -> None:
    pods = [pod("a", cpu="1", memory="1Gi", node_name="n1"),
            pod("b", cpu="1", memory="1Gi", node_name="n1", phase="Succeeded"),
            pod("c", cpu="1", memory="1Gi"),
            pod("d", memory="2Gi", node_name="n2", phase="Running")]
    usage = s.usage_by_node(pods)
    assert usage["n1"].requested == {"cpu": 1000, "memory": GI} and usage["n1"].pods == 1
    assert usage["n2"].requested["memory"] == 2 * GI and set(usage) == {"n1", "n2"}


def test_terminating_pods_count_until_they_are_gone() -> None:
    """As kube-scheduler: a pod with a deletionTimestamp still holds its requests on its node (its containers
    are stopping there) until the node agent removes it; a finished one holds nothing."""
    terminating = pod("t", memory="3Gi", node_name="n1", phase="Running")
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    usage = s.usage_by_node([terminating])
    assert usage["n1"].requested["memory"] == 3 * GI
    n = node("n1", memory="4Gi")
    assert reasons(pod(memory="2Gi"), n, usage["n1"]) == ["Insufficient memory"]
    assert reasons(pod(memory="2Gi"), n, s.usage_by_node([])) == []


# ------------------------------------------------------------------------------------------- filters


def test_cordoned_node_is_unschedulable_unless_tolerated() -> None:
    n = node("n1", unschedulable=True)
    assert reasons(pod(), n) == ["node(s) were unschedulable"]
    tolerating = pod(tolerations=[{"key": "node.kubernetes.io/unschedulable", "operator": "Exists",
                                   "effect": "NoSchedule"}])
    assert reasons(tolerating, n) == []


@pytest.mark.parametrize("toleration, ok", [
    ({"key": "dedicated", "operator": "Equal", "value": "vms", "effect": "NoSchedule"}, True),
    ({"key": "dedicated", "value": "vms"}, True),  # Equal is the default operator; empty effect matches all
    ({"key": "dedicated", "operator": "Exists"}, True),
    ({"operator": "Exists"}, True),  # empty key with Exists tolerates everything
    ({"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}, False),
    ({"key": "dedicated", "operator": "Equal", "value": "vms", "effect": "NoExecute"}, False),
    ({"key": "other", "operator": "Exists"}, False),
])
def test_taints_and_tolerations(toleration: JSON, ok: bool) -> None:
    n = node("n1", taints=[{"key": "dedicated", "value": "vms", "effect": "NoSchedule"}])
    got = reasons(pod(tolerations=[toleration]), n)
    assert got == ([] if ok else ["node(s) had untolerated taint {dedicated: vms}"])


def test_prefer_no_schedule_taint_does_not_filter() -> None:
    n = node("n1", taints=[{"key": "soft", "value": "", "effect": "PreferNoSchedule"}])
    assert reasons(pod(), n) == []


def test_not_ready_and_unknown_nodes_carry_the_lifecycle_taints() -> None:
    assert reasons(pod(), node("n1", ready="False")) == [
        "node(s) had untolerated taint {node.kubernetes.io/not-ready: }"]
    assert reasons(pod(), node("n1", ready="Unknown")) == [
        "node(s) had untolerated taint {node.kubernetes.io/unreachable: }"]
    tolerating = pod(tolerations=[{"key": "node.kubernetes.io/not-ready", "operator": "Exists"}])
    assert reasons(tolerating, node("n1", ready="False")) == []


def test_node_selector_and_schedulable_label_for_launchers() -> None:
    n = node("n1", labels={"disk": "ssd"})
    assert reasons(pod(nodeSelector={"disk": "ssd"}), n) == []
    assert reasons(pod(nodeSelector={"disk": "hdd"}), n) == ["node(s) didn't match Pod's node affinity/selector"]
    plain = node("n2")
    plain["metadata"]["labels"].pop("kubevirt.io/schedulable")
    assert reasons(pod(), plain) == []  # ordinary pods do not care
    assert reasons(pod(launcher=True), plain) == ["node(s) didn't match Pod's node affinity/selector"]


def _affinity(*terms: JSON) -> JSON:
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": list(terms)}}}


@pytest.mark.parametrize("expr, ok", [
    ({"key": "zone", "operator": "In", "values": ["a", "b"]}, True),
    ({"key": "zone", "operator": "In", "values": ["c"]}, False),
    ({"key": "zone", "operator": "NotIn", "values": ["c"]}, True),
    ({"key": "missing", "operator": "NotIn", "values": ["c"]}, True),
    ({"key": "zone", "operator": "NotIn", "values": ["a"]}, False),
    ({"key": "zone", "operator": "Exists"}, True),
    ({"key": "missing", "operator": "Exists"}, False),
    ({"key": "missing", "operator": "DoesNotExist"}, True),
    ({"key": "zone", "operator": "DoesNotExist"}, False),
    ({"key": "cores", "operator": "Gt", "values": ["8"]}, True),
    ({"key": "cores", "operator": "Gt", "values": ["16"]}, False),
    ({"key": "cores", "operator": "Lt", "values": ["32"]}, True),
    ({"key": "zone", "operator": "Gt", "values": ["1"]}, False),  # not an integer
])
def test_required_node_affinity_operators(expr: JSON, ok: bool) -> None:
    n = node("n1", labels={"zone": "a", "cores": "16"})
    got = reasons(pod(affinity=_affinity({"matchExpressions": [expr]})), n)
    assert got == ([] if ok else ["node(s) didn't match Pod's node affinity/selector"])


def test_affinity_terms_are_ored_expressions_anded_and_match_fields_by_name() -> None:
    n = node("n1", labels={"zone": "a"})
    no = {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}
    yes = {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
    both = {"matchExpressions": [yes["matchExpressions"][0], no["matchExpressions"][0]]}
    assert reasons(pod(affinity=_affinity(no, yes)), n) == []
    assert reasons(pod(affinity=_affinity(both)), n) != []
    by_name = {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}
    assert reasons(pod(affinity=_affinity(by_name)), n) == []
    assert reasons(pod(affinity=_affinity({"matchFields": [{"key": "metadata.name", "operator": "NotIn",
                                                             "values": ["n1"]}]})), n) != []
    assert reasons(pod(affinity=_affinity({})), n) != []  # an empty term matches nothing


def test_resources_fit_against_allocatable_with_usage() -> None:
    n = node("n1", cpu="2", memory="1Gi", pods="2")
    used = s.NodeUsage()
    used.add({"cpu": 1500, "memory": 512 * MI})
    assert reasons(pod(cpu="500m", memory="512Mi"), n, used) == []
    assert reasons(pod(cpu="600m", memory="600Mi"), n, used) == ["Insufficient cpu", "Insufficient memory"]
    used.add({})
    assert reasons(pod(), n, used) == ["Too many pods"]


def test_first_failing_filter_wins_per_node() -> None:
    n = node("n1", memory="1Gi", unschedulable=True, taints=[{"key": "x", "value": "y", "effect": "NoSchedule"}])
    assert reasons(pod(memory="4Gi"), n) == ["node(s) were unschedulable"]


# ------------------------------------------------------------------------------------------- decisions


def test_message_is_kube_schedulers() -> None:
    assert s.failure_message(1, [["Insufficient memory"]]) == "0/1 nodes are available: 1 Insufficient memory."
    msg = s.failure_message(4, [["node(s) were unschedulable"], ["Insufficient cpu", "Insufficient memory"],
                                ["Insufficient memory"], ["node(s) had untolerated taint {a: b}"]])
    assert msg == ("0/4 nodes are available: 1 Insufficient cpu, 1 node(s) had untolerated taint {a: b}, "
                   "1 node(s) were unschedulable, 2 Insufficient memory.")
    assert s.failure_message(0, []) == "no nodes available to schedule pods"


def test_schedule_picks_least_allocated_then_name() -> None:
    nodes = [node("n1"), node("n2"), node("n3", memory="1Gi")]
    usage = {"n1": s.NodeUsage()}
    usage["n1"].add({"cpu": 2000, "memory": 4 * GI})
    assert s.schedule(pod(cpu="1", memory="512Mi"), nodes, usage) == s.Decision("n2")
    assert s.schedule(pod(cpu="1", memory="512Mi"), [node("b"), node("a")], {}) == s.Decision("a")


def test_schedule_reports_why_nothing_fits() -> None:
    nodes = [node("n1", memory="1Gi"), node("n2", unschedulable=True)]
    d = s.schedule(pod(memory="2Gi"), nodes, {})
    assert d.node is None
    assert d.message == "0/2 nodes are available: 1 Insufficient memory, 1 node(s) were unschedulable."


def test_wants_scheduling() -> None:
    assert s.wants_scheduling(pod())
    assert not s.wants_scheduling(pod(node_name="n1"))
    assert not s.wants_scheduling(pod(schedulerName="other"))
    assert s.wants_scheduling(pod(schedulerName="default-scheduler"))
    assert not s.wants_scheduling(pod(phase="Failed"))
    deleting = pod()
    deleting["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    assert not s.wants_scheduling(deleting)


def test_pod_scheduled_condition_patch_keeps_the_kubelets_conditions() -> None:
    """The scheduler patches PodScheduled with a strategic merge patch: conditions merge by type."""
    current = pod()
    current["status"]["conditions"] = [{"type": "Ready", "status": "False"},
                                       {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]
    body = {"status": {"conditions": [{"type": "PodScheduled", "status": "True", "reason": None, "message": None}]}}
    merged = patch.strategic_merge_patch(current, body, patch.builtin_merge_keys("", "Pod"))
    assert merged["status"]["conditions"] == [{"type": "Ready", "status": "False"},
                                              {"type": "PodScheduled", "status": "True"}]
