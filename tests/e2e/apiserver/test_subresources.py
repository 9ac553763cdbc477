"""KubeVirt's VM subresources change desired state exactly as virt-api does; pods/binding binds once."""

from __future__ import annotations

import json

import pytest

from tests.e2e.apiserver.test_bad_input import call, vm
from virtplane.testing.cluster import Cluster

pytestmark = pytest.mark.e2e
SUB = "/apis/subresources.kubevirt.io/v1/namespaces/default/virtualmachines"
VMS = "/apis/kubevirt.io/v1/namespaces/default/virtualmachines"


def test_start_stop_on_halted_vm_flip_run_strategy(cluster: Cluster) -> None:
    assert call(cluster, "POST", VMS, json.dumps(vm("sub-halted")).encode())[0] == 201
    code, body = call(cluster, "PUT", f"{SUB}/sub-halted/stop", b"{}")
    assert code == 409 and "not running" in body["message"]
    assert call(cluster, "PUT", f"{SUB}/sub-halted/start", b"{}")[0] == 202
    assert call(cluster, "GET", f"{VMS}/sub-halted", None)[1]["spec"]["runStrategy"] == "Always"
    assert call(cluster, "PUT", f"{SUB}/sub-halted/stop", b"{}")[0] == 202
    assert call(cluster, "GET", f"{VMS}/sub-halted", None)[1]["spec"]["runStrategy"] == "Halted"
    code, body = call(cluster, "PUT", f"{SUB}/sub-halted/restart", b"{}")
    assert code == 409 and "Halted" in body["message"]
    call(cluster, "DELETE", f"{VMS}/sub-halted", None)


def test_start_on_manual_vm_records_a_state_change_request(bare_api: Cluster) -> None:
    cluster = bare_api  # without controllers, so nothing consumes the request before we look
    assert call(cluster, "POST", VMS, json.dumps(vm("sub-manual", runStrategy="Manual")).encode())[0] == 201
    assert call(cluster, "PUT", f"{SUB}/sub-manual/start", b"{}")[0] == 202
    got = call(cluster, "GET", f"{VMS}/sub-manual", None)[1]
    assert got["spec"]["runStrategy"] == "Manual"
    assert got["status"]["stateChangeRequests"] == [{"action": "Start"}]
    call(cluster, "DELETE", f"{VMS}/sub-manual", None)


def test_unknown_vm_and_unknown_subresource_are_404(cluster: Cluster) -> None:
    code, body = call(cluster, "PUT", f"{SUB}/no-such-vm/start", b"{}")
    assert code == 404 and body["reason"] == "NotFound"
    code, _ = call(cluster, "PUT", f"{SUB}/no-such-vm/levitate", b"{}")
    assert code == 404


def test_pod_binding_sets_node_once(cluster: Cluster) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bind-me"},
           "spec": {"schedulerName": "none", "containers": [{"name": "c", "image": "busybox"}]}}
    assert call(cluster, "POST", "/api/v1/namespaces/default/pods", json.dumps(pod).encode())[0] == 201
    binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "bind-me"},
               "target": {"apiVersion": "v1", "kind": "Node", "name": "node-a"}}
    url = "/api/v1/namespaces/default/pods/bind-me/binding"
    assert call(cluster, "POST", url, json.dumps(binding).encode())[0] == 201
    assert call(cluster, "GET", "/api/v1/namespaces/default/pods/bind-me", None)[1]["spec"]["nodeName"] == "node-a"
    binding["target"]["name"] = "node-b"
    code, body = call(cluster, "POST", url, json.dumps(binding).encode())
    assert code == 409 and "already assigned" in body["message"]
    call(cluster, "DELETE", "/api/v1/namespaces/default/pods/bind-me", None)
