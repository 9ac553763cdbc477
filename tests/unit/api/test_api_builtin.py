"""Built-in resources and their computed table rows."""

from __future__ import annotations

from typing import Any

import pytest

from virtplane.api import builtin, resources, validation

TS = "2026-08-01T10:00:00Z"


@pytest.fixture(scope="module")
def by_kind() -> dict[str, resources.Resource]:
    return {r.kind: r for r in builtin.builtin_resources()}


def test_names_scopes_and_subresources(by_kind: dict[str, resources.Resource]) -> None:
    expect = {
        "Namespace": ("", "namespaces", ("ns",), False), "Node": ("", "nodes", ("no",), False),
        "Pod": ("", "pods", ("po",), True), "Service": ("", "services", ("svc",), True),
        "Endpoints": ("", "endpoints", ("ep",), True), "PersistentVolume": ("", "persistentvolumes", ("pv",), False),
        "PersistentVolumeClaim": ("", "persistentvolumeclaims", ("pvc",), True),
        "ConfigMap": ("", "configmaps", ("cm",), True), "Secret": ("", "secrets", (), True),
        "Event": ("", "events", ("ev",), True), "ServiceAccount": ("", "serviceaccounts", ("sa",), True),
        "StorageClass": ("storage.k8s.io", "storageclasses", ("sc",), False),
        "Lease": ("coordination.k8s.io", "leases", (), True),
        "CustomResourceDefinition": ("apiextensions.k8s.io", "customresourcedefinitions", ("crd", "crds"), False),
        "Deployment": ("apps", "deployments", ("deploy",), True), "ReplicaSet": ("apps", "replicasets", ("rs",), True),
        "ControllerRevision": ("apps", "controllerrevisions", (), True),
        "EndpointSlice": ("discovery.k8s.io", "endpointslices", (), True),
        "Role": ("rbac.authorization.k8s.io", "roles", (), True),
        "ClusterRole": ("rbac.authorization.k8s.io", "clusterroles", (), False),
        "RoleBinding": ("rbac.authorization.k8s.io", "rolebindings", (), True),
        "ClusterRoleBinding": ("rbac.authorization.k8s.io", "clusterrolebindings", (), False),
        "SelfSubjectAccessReview": ("authorization.k8s.io", "selfsubjectaccessreviews", (), False),
        "SelfSubjectRulesReview": ("authorization.k8s.io", "selfsubjectrulesreviews", (), False),
        "SubjectAccessReview": ("authorization.k8s.io", "subjectaccessreviews", (), False),
        "LocalSubjectAccessReview": ("authorization.k8s.io", "localsubjectaccessreviews", (), True),
        "SelfSubjectReview": ("authentication.k8s.io", "selfsubjectreviews", (), False),
    }
    assert {k: (r.group, r.plural, r.short_names, r.namespaced) for k, r in by_kind.items()} == expect
    assert {k for k, r in by_kind.items() if "all" in r.categories} == {"Pod", "Service", "Deployment", "ReplicaSet"}
    assert by_kind["Deployment"].scale == (".spec.replicas", ".status.replicas", ".status.selector")
    assert by_kind["ReplicaSet"].scale is not None and by_kind["Pod"].scale is None
    assert by_kind["Pod"].status_subresource and not by_kind["ConfigMap"].status_subresource
    assert "deletecollection" not in by_kind["Namespace"].verbs
    for r in by_kind.values():
        assert r.schema is not None and r.list_kind == r.kind + "List" and not r.from_crd
        validation.compile_schema(r.schema)


def test_builtin_schemas_type_top_level_fields(by_kind: dict[str, resources.Resource]) -> None:
    cm = validation.compile_schema(by_kind["ConfigMap"].schema or {})
    assert cm.validate({"data": {"a": "b"}}) == []
    assert [c.field for c in cm.validate({"data": {"a": 1}})] == ["data.a"]
    assert cm.unknown_fields({"data": {}, "dta": {}}) == ["dta"]
    ns = validation.compile_schema(by_kind["Namespace"].schema or {})
    assert [c.field for c in ns.validate({"spec": {"finalizers": "kubernetes"}})] == ["spec.finalizers"]
    sc = validation.compile_schema(by_kind["StorageClass"].schema or {})
    assert [c.field for c in sc.validate({"metadata": {"name": "x"}})] == ["provisioner"]
    pod = validation.compile_schema(by_kind["Pod"].schema or {})
    assert pod.unknown_fields({"spec": {"anything": {"goes": 1}}}) == []


def _cols(res: resources.Resource) -> list[str]:
    return [c.name for c in res.printer_columns]


def test_columns_as_kubectl_shows_them(by_kind: dict[str, resources.Resource]) -> None:
    assert _cols(by_kind["Pod"])[:4] == ["Ready", "Status", "Restarts", "Age"]
    assert [c.priority for c in by_kind["Pod"].printer_columns][4:6] == [1, 1]
    assert _cols(by_kind["Node"])[:4] == ["Status", "Roles", "Age", "Version"]
    assert _cols(by_kind["Namespace"]) == ["Status", "Age"]
    assert _cols(by_kind["PersistentVolumeClaim"])[:5] == ["Status", "Volume", "Capacity", "Access Modes",
                                                           "StorageClass"]
    assert _cols(by_kind["PersistentVolume"])[:6] == ["Capacity", "Access Modes", "Reclaim Policy", "Status",
                                                      "Claim", "StorageClass"]
    assert _cols(by_kind["StorageClass"]) == ["Provisioner", "ReclaimPolicy", "VolumeBindingMode",
                                              "AllowVolumeExpansion", "Age"]
    assert _cols(by_kind["Service"])[:5] == ["Type", "Cluster-IP", "External-IP", "Port(s)", "Age"]
    assert _cols(by_kind["ConfigMap"]) == ["Data", "Age"]
    assert _cols(by_kind["Secret"]) == ["Type", "Data", "Age"]
    assert _cols(by_kind["Lease"]) == ["Holder", "Age"]
    assert _cols(by_kind["CustomResourceDefinition"]) == ["Created At"]
    assert _cols(by_kind["Deployment"])[:4] == ["Ready", "Up-to-date", "Available", "Age"]
    ev = [c.name for c in by_kind["Event"].printer_columns if c.priority == 0]
    assert ev == ["Last Seen", "Type", "Reason", "Object", "Message"]


def _row(by_kind: dict[str, resources.Resource], kind: str, obj: dict[str, Any]) -> list[Any]:
    row = builtin.builtin_table_row(by_kind[kind], obj)
    assert row is not None and len(row) == len(by_kind[kind].printer_columns)
    return row


def test_pod_row(by_kind: dict[str, resources.Resource]) -> None:
    pod = {
        "metadata": {"name": "virt-launcher-vm-abcde", "creationTimestamp": TS},
        "spec": {"nodeName": "node1", "containers": [{"name": "compute"}, {"name": "guest-console-log"}]},
        "status": {"phase": "Running", "podIP": "10.244.0.12",
                   "containerStatuses": [
                       {"name": "compute", "ready": True, "restartCount": 1, "state": {"running": {}}},
                       {"name": "guest-console-log", "ready": False, "restartCount": 2,
                        "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]},
    }
    assert _row(by_kind, "Pod", pod)[:6] == ["1/2", "CrashLoopBackOff", "3", TS, "10.244.0.12", "node1"]
    pod["status"]["containerStatuses"][1] = {"name": "x", "ready": True, "state": {"running": {}}}
    assert _row(by_kind, "Pod", pod)[:2] == ["2/2", "Running"]
    pod["metadata"]["deletionTimestamp"] = TS
    assert _row(by_kind, "Pod", pod)[1] == "Terminating"
    pending = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}, "status": {"phase": "Pending"}}
    assert _row(by_kind, "Pod", pending)[:3] == ["0/1", "Pending", "0"]
    done = {"spec": {"containers": [{"name": "c"}]},
            "status": {"phase": "Succeeded", "containerStatuses": [
                {"ready": False, "state": {"terminated": {"reason": "Completed", "exitCode": 0}}}]}}
    assert _row(by_kind, "Pod", done)[1] == "Completed"


def test_node_row(by_kind: dict[str, resources.Resource]) -> None:
    node = {"metadata": {"name": "n1", "creationTimestamp": TS,
                         "labels": {"node-role.kubernetes.io/control-plane": "", "node-role.kubernetes.io/worker": ""}},
            "spec": {"unschedulable": True},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                       "addresses": [{"type": "InternalIP", "address": "192.168.1.10"}],
                       "nodeInfo": {"kubeletVersion": "v1.32.0", "osImage": "Debian", "kernelVersion": "6.1",
                                    "containerRuntimeVersion": "virtplane://0.1"}}}
    assert _row(by_kind, "Node", node) == ["Ready,SchedulingDisabled", "control-plane,worker", TS, "v1.32.0",
                                           "192.168.1.10", "<none>", "Debian", "6.1", "virtplane://0.1"]
    assert _row(by_kind, "Node", {"metadata": {"name": "n2"}})[:2] == ["Unknown", "<none>"]


def test_storage_rows(by_kind: dict[str, resources.Resource]) -> None:
    pvc = {"metadata": {"creationTimestamp": TS},
           "spec": {"volumeName": "pv-1", "storageClassName": "local"},
           "status": {"phase": "Bound", "capacity": {"storage": "5Gi"},
                      "accessModes": ["ReadWriteMany", "ReadWriteOnce"]}}
    assert _row(by_kind, "PersistentVolumeClaim", pvc)[:5] == ["Bound", "pv-1", "5Gi", "RWO,RWX", "local"]
    pv = {"spec": {"capacity": {"storage": "5Gi"}, "accessModes": ["ReadWriteOnce"],
                   "persistentVolumeReclaimPolicy": "Delete", "claimRef": {"namespace": "default", "name": "c"},
                   "storageClassName": "local"},
          "status": {"phase": "Bound"}}
    assert _row(by_kind, "PersistentVolume", pv)[:6] == ["5Gi", "RWO", "Delete", "Bound", "default/c", "local"]
    sc = {"provisioner": "virtplane.io/local", "metadata": {"creationTimestamp": TS}}
    assert _row(by_kind, "StorageClass", sc) == ["virtplane.io/local", "Delete", "Immediate", "false", TS]


def test_misc_rows(by_kind: dict[str, resources.Resource]) -> None:
    svc = {"spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "selector": {"app": "web"},
                    "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}]}}
    assert _row(by_kind, "Service", svc)[:4] == ["NodePort", "10.96.0.10", "<none>", "80:30080/TCP,53/UDP"]
    assert _row(by_kind, "ConfigMap", {"data": {"a": "1", "b": "2"}, "binaryData": {"c": "AA=="}})[0] == 3
    assert _row(by_kind, "Secret", {"data": {"a": "MQ=="}})[:2] == ["Opaque", 1]
    dep = {"spec": {"replicas": 3, "selector": {"matchLabels": {"app": "x"}},
                    "template": {"spec": {"containers": [{"name": "c", "image": "nginx"}]}}},
           "status": {"readyReplicas": 2, "updatedReplicas": 3, "availableReplicas": 2}}
    assert _row(by_kind, "Deployment", dep) == ["2/3", 3, 2, None, "c", "nginx", "app=x"]
    ev = {"metadata": {"name": "vm.17a"}, "involvedObject": {"kind": "VirtualMachine", "name": "vm"},
          "reason": "SuccessfulCreate", "message": "Started the virtual machine", "type": "Normal",
          "firstTimestamp": TS, "lastTimestamp": TS, "count": 2, "source": {"component": "virt-controller"}}
    assert _row(by_kind, "Event", ev) == [TS, "Normal", "SuccessfulCreate", "virtualmachine/vm", "",
                                          "virt-controller", "Started the virtual machine", TS, 2, "vm.17a"]


def test_rows_only_for_computed_kinds(by_kind: dict[str, resources.Resource],
                                      served: dict[str, resources.Resource]) -> None:
    assert builtin.builtin_table_row(by_kind["Namespace"], {}) is None
    assert builtin.builtin_table_row(by_kind["Lease"], {}) is None
    assert builtin.builtin_table_row(served["VirtualMachine"], {}) is None


@pytest.mark.parametrize("kind", ["Pod", "Node", "Service", "Endpoints", "PersistentVolume", "PersistentVolumeClaim",
                                  "ConfigMap", "Secret", "Event", "ServiceAccount", "StorageClass", "Deployment",
                                  "ReplicaSet", "EndpointSlice"])
def test_computed_rows_survive_empty_objects(by_kind: dict[str, resources.Resource], kind: str) -> None:
    _row(by_kind, kind, {})
    _row(by_kind, kind, {"metadata": None, "spec": [], "status": "x"})
