"""Replay of a real kubectl session (kubectl_session.json, captured from kubectl v1.32.4) through the
patch and apply functions, as the API server would run them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from virtplane.api.apply import LAST_APPLIED_ANNOTATION, managed_field_paths, server_side_apply, update_managed_fields
from virtplane.api.patch import (
    MergeKeys,
    builtin_merge_keys,
    json_merge_patch,
    json_patch,
    merge_keys_from_schema,
    strategic_merge_patch,
)

HERE = Path(__file__).parent
REPO = HERE.parents[2]
NOW = "2024-05-01T10:00:00Z"


def _keys(path: str) -> MergeKeys:
    if "/kubevirt.io/" in path:
        crds = REPO / "virtplane" / "api" / "data" / "crds.json"
        if not crds.exists():
            pytest.skip("crds.json not generated")
        crd = next(c for c in json.loads(crds.read_text()) if c["spec"]["names"]["kind"] == "VirtualMachine")
        return merge_keys_from_schema(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    return builtin_merge_keys("apps", "Deployment")


def replay() -> dict[str, dict[str, Any]]:
    store: dict[str, dict[str, Any]] = {}
    rv = 100
    requests = json.loads((HERE / "kubectl_session.json").read_text())["requests"]
    for req in requests:
        body, query, path = copy.deepcopy(req["body"]), req["query"], req["path"]
        keys = _keys(path)
        rv += 1
        if req["method"] == "POST":
            obj = body
            path = f"{path}/{obj['metadata']['name']}"
            obj["metadata"].update(uid=f"uid-{rv}", creationTimestamp=NOW)
            update_managed_fields(None, obj, manager=query["fieldManager"], now=NOW, list_keys=keys)
        elif path.endswith("/scale"):
            # the scale subresource: a merge patch on the Scale view, no fieldManager (derived from the
            # User-Agent: "kubectl")
            path = path.removesuffix("/scale")
            live = store[path]
            scale = json_merge_patch({"spec": {"replicas": live["spec"]["replicas"]}}, body)
            obj = copy.deepcopy(live)
            obj["spec"]["replicas"] = scale["spec"]["replicas"]
            update_managed_fields(live, obj, manager="kubectl", subresource="scale", now=NOW, list_keys=keys)
        else:
            live = store.get(path)
            ct = req["contentType"]
            manager = query.get("fieldManager", "kubectl")
            if ct == "application/apply-patch+yaml":
                obj = server_side_apply(
                    live, body, manager=manager, force=query.get("force") == "true", list_keys=keys, now=NOW
                )
            else:
                assert live is not None
                if ct == "application/strategic-merge-patch+json":
                    obj = strategic_merge_patch(live, body, keys)
                elif ct == "application/merge-patch+json":
                    obj = json_merge_patch(live, body)
                else:
                    assert ct == "application/json-patch+json"
                    obj = json_patch(live, body)
                update_managed_fields(live, obj, manager=manager, now=NOW, list_keys=keys)
        obj["metadata"]["resourceVersion"] = str(rv)
        store[path] = obj
    return store


def managers(obj: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(e["manager"], e["operation"], e.get("subresource", "")) for e in obj["metadata"]["managedFields"]]


def test_deployment_session() -> None:
    web = replay()["/apis/apps/v1/namespaces/default/deployments/web"]
    meta, spec = web["metadata"], web["spec"]
    assert meta["labels"] == {"app": "web", "env": "prod"}
    assert meta["finalizers"] == ["example.com/b", "example.com/c"]
    assert spec["replicas"] == 6
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert [(c["name"], c["image"]) for c in pod["containers"]] == [
        ("debug", "busybox"),
        ("nginx", "nginx:1.16"),
        ("sidecar", "envoy:v2"),
    ]
    assert pod["volumes"] == [{"name": "cfg", "secret": {"secretName": "cfg"}}]

    assert sorted(managers(web)) == [
        ("kubectl", "Update", "scale"),
        ("kubectl-client-side-apply", "Update", ""),
        ("kubectl-edit", "Update", ""),
        ("kubectl-label", "Update", ""),
        ("kubectl-patch", "Update", ""),
    ]
    assert managed_field_paths(web, "kubectl", "Update", "scale") == [".spec.replicas"]
    assert managed_field_paths(web, "kubectl-label", "Update") == [".metadata.labels.env"]
    assert managed_field_paths(web, "kubectl-edit", "Update") == [
        '.spec.template.spec.containers[name="sidecar"].image'
    ]
    csa = managed_field_paths(web, "kubectl-client-side-apply", "Update")
    assert ".spec.replicas" not in csa and ".metadata.labels.tier" not in csa
    assert '.spec.template.spec.containers[name="nginx"].image' in csa
    assert '.metadata.finalizers[="example.com/c"]' in csa


def test_virtual_machine_session_client_side_then_server_side() -> None:
    vm = replay()["/apis/kubevirt.io/v1/namespaces/default/virtualmachines/vm1"]
    spec = vm["spec"]["template"]["spec"]
    # vm1.yaml won again through `kubectl apply --server-side`, without --force-conflicts
    assert vm["spec"]["runStrategy"] == "Halted"
    assert spec["domain"] == {
        "cpu": {"cores": 1},
        "devices": {
            "disks": [{"disk": {"bus": "virtio"}, "name": "root"}, {"disk": {"bus": "virtio"}, "name": "cloudinit"}]
        },
        "memory": {"guest": "512Mi"},
    }
    assert [v["name"] for v in spec["volumes"]] == ["root", "cloudinit"]
    last = json.loads(vm["metadata"]["annotations"][LAST_APPLIED_ANNOTATION])
    assert last["spec"]["runStrategy"] == "Halted" and "annotations" not in last["metadata"]
    # kubectl's own upgrade rewrote managedFields: client-side ownership moved to the "kubectl" applier
    assert managers(vm) == [("kubectl", "Apply", ""), ("kubectl-last-applied", "Apply", "")]
    owned = managed_field_paths(vm, "kubectl")
    assert ".spec.runStrategy" in owned and ".spec.template.spec.domain.devices.disks" in owned
    assert managed_field_paths(vm, "kubectl-last-applied") == [f".metadata.annotations.{LAST_APPLIED_ANNOTATION}"]
