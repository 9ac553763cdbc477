"""The official `kubernetes` Python client, unchanged, against virtplane."""

from __future__ import annotations

import threading

import pytest
from kubernetes import client, config, watch

from virtplane.testing.cluster import Cluster

pytestmark = pytest.mark.e2e


def test_custom_objects_list_watch_create(cluster: Cluster) -> None:
    api_client = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    co = client.CustomObjectsApi(api_client)
    body = {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "pyclient-vm"},
        "spec": {"runStrategy": "Halted", "template": {"spec": {"domain": {
            "devices": {}, "resources": {"requests": {"memory": "64Mi"}}}}}},
    }
    listed = co.list_namespaced_custom_object("kubevirt.io", "v1", "default", "virtualmachines")
    rv = listed["metadata"]["resourceVersion"]
    seen: list[tuple[str, str]] = []
    got_it = threading.Event()

    def watcher() -> None:
        w = watch.Watch()
        for ev in w.stream(co.list_namespaced_custom_object, "kubevirt.io", "v1", "default", "virtualmachines",
                           resource_version=rv, timeout_seconds=30):
            seen.append((ev["type"], ev["object"]["metadata"]["name"]))
            if ev["object"]["metadata"]["name"] == "pyclient-vm":
                got_it.set()
                w.stop()

    t = threading.Thread(target=watcher, daemon=True)
    t.start()
    created = co.create_namespaced_custom_object("kubevirt.io", "v1", "default", "virtualmachines", body)
    assert created["metadata"]["uid"]
    assert got_it.wait(20), seen
    assert ("ADDED", "pyclient-vm") in seen
    names = [i["metadata"]["name"] for i in
             co.list_namespaced_custom_object("kubevirt.io", "v1", "default", "virtualmachines")["items"]]
    assert "pyclient-vm" in names
    core = client.CoreV1Api(api_client)
    assert "default" in [n.metadata.name for n in core.list_namespace().items]
    co.delete_namespaced_custom_object("kubevirt.io", "v1", "default", "virtualmachines", "pyclient-vm")
