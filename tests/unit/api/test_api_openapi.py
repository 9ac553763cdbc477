"""OpenAPI v2/v3 documents: the shapes kubectl explain and kubectl's field-validation probe rely on."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from virtplane.api import openapi, resources


@pytest.fixture(scope="module")
def all_resources(served: dict[str, resources.Resource]) -> list[resources.Resource]:
    return list(served.values())


@pytest.fixture(scope="module")
def kubevirt_v3(all_resources: list[resources.Resource]) -> dict[str, Any]:
    return openapi.openapi_v3(all_resources, "apis/kubevirt.io/v1")


def test_definition_names(served: dict[str, resources.Resource]) -> None:
    assert openapi.definition_name(served["VirtualMachine"]) == "io.kubevirt.v1.VirtualMachine"
    assert openapi.definition_name(served["DataVolume"]) == "io.kubevirt.cdi.v1beta1.DataVolume"
    assert openapi.definition_name(served["NetworkAttachmentDefinition"]) == \
        "io.cncf.cni.k8s.v1.NetworkAttachmentDefinition"
    assert openapi.definition_name(served["Pod"]) == "io.k8s.api.core.v1.Pod"
    assert openapi.definition_name(served["StorageClass"]) == "io.k8s.api.storage.v1.StorageClass"
    assert openapi.definition_name(served["CustomResourceDefinition"]) == \
        "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.CustomResourceDefinition"


def test_v3_index(all_resources: list[resources.Resource]) -> None:
    index = openapi.openapi_v3_index(all_resources)["paths"]
    assert {"api/v1", "apis/apps/v1", "apis/kubevirt.io/v1", "apis/cdi.kubevirt.io/v1beta1",
            "apis/k8s.cni.cncf.io/v1"} <= set(index)
    url = index["apis/kubevirt.io/v1"]["serverRelativeURL"]
    assert url.startswith("/openapi/v3/apis/kubevirt.io/v1?hash=") and len(url.split("=")[1]) == 128
    # the hash follows the document: drop a kind from the group-version and it changes
    fewer = [r for r in all_resources if r.kind != "KubeVirt"]
    assert openapi.openapi_v3_index(fewer)["paths"]["apis/kubevirt.io/v1"]["serverRelativeURL"] != url
    assert openapi.openapi_v3_index(fewer)["paths"]["api/v1"] == index["api/v1"]


def test_v3_patch_advertises_field_validation(kubevirt_v3: dict[str, Any]) -> None:
    """kubectl's queryParamVerifierV3: a PATCH op with the GVK extension and a `fieldValidation` query
    parameter means "validate on the server"."""
    item = kubevirt_v3["paths"]["/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachines/{name}"]
    patch = item["patch"]
    assert patch["x-kubernetes-group-version-kind"] == {"group": "kubevirt.io", "kind": "VirtualMachine",
                                                        "version": "v1"}
    names = {(p["name"], p["in"]) for p in patch["parameters"]}
    assert {("fieldValidation", "query"), ("dryRun", "query"), ("fieldManager", "query"), ("force", "query")} <= names
    assert set(patch["requestBody"]["content"]) == {"application/json-patch+json", "application/merge-patch+json",
                                                    "application/apply-patch+yaml"}
    post = kubevirt_v3["paths"]["/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachines"]["post"]
    assert "fieldValidation" in {p["name"] for p in post["parameters"]}
    assert {p["name"] for p in item["parameters"]} == {"name", "namespace", "pretty"}


def test_v3_paths_for_explain(kubevirt_v3: dict[str, Any]) -> None:
    paths = kubevirt_v3["paths"]
    assert "/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachines/{name}/status" in paths
    assert "/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachineinstances/{name}/status" not in paths
    scale = paths["/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachineinstancereplicasets/{name}/scale"]
    assert scale["get"]["x-kubernetes-group-version-kind"]["kind"] == "Scale"
    assert "/apis/kubevirt.io/v1/virtualmachines" in paths  # list across namespaces
    assert not any(p.startswith("/api/v1") or "/cdi.kubevirt.io/" in p for p in paths)
    listing = paths["/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachines"]["get"]
    assert listing["x-kubernetes-action"] == "list"
    assert listing["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/io.kubevirt.v1.VirtualMachineList"}


def test_v3_schemas(kubevirt_v3: dict[str, Any]) -> None:
    schemas = kubevirt_v3["components"]["schemas"]
    vm = schemas["io.kubevirt.v1.VirtualMachine"]
    assert vm["x-kubernetes-group-version-kind"] == [{"group": "kubevirt.io", "kind": "VirtualMachine",
                                                      "version": "v1"}]
    assert vm["properties"]["metadata"]["allOf"] == [
        {"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}]
    assert "runStrategy" in vm["properties"]["spec"]["properties"]
    vm_list = schemas["io.kubevirt.v1.VirtualMachineList"]
    assert vm_list["properties"]["items"]["items"] == {"$ref": "#/components/schemas/io.kubevirt.v1.VirtualMachine"}
    meta = schemas["io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"]
    assert {"name", "namespace", "labels", "annotations", "ownerReferences"} <= set(meta["properties"])
    # every $ref resolves inside the document
    text = orjson.dumps(kubevirt_v3).decode()
    for ref in set(part.split('"')[0] for part in text.split('"$ref":"#/components/schemas/')[1:]):
        assert ref in schemas, ref


def test_v2_document(all_resources: list[resources.Resource]) -> None:
    doc = openapi.openapi_v2(all_resources)
    assert doc["swagger"] == "2.0"
    defs = doc["definitions"]
    vm = defs["io.kubevirt.v1.VirtualMachine"]
    assert vm["properties"]["metadata"]["$ref"] == "#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    assert vm["x-kubernetes-group-version-kind"][0]["kind"] == "VirtualMachine"
    text = orjson.dumps(doc).decode()
    assert "anyOf" not in text and '"nullable"' not in text  # v2 cannot say these
    patch = doc["paths"]["/api/v1/namespaces/{namespace}/pods/{name}"]["patch"]
    assert "application/strategic-merge-patch+json" in patch["consumes"]
    assert patch["operationId"] == "patchCoreV1NamespacedPod"
    assert "fieldValidation" in {p["name"] for p in patch["parameters"]}
    lst = doc["paths"]["/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachines"]["get"]
    assert lst["operationId"] == "listKubevirtIoV1NamespacedVirtualMachine" and lst["tags"] == ["kubevirtIo_v1"]
    all_ns = doc["paths"]["/apis/kubevirt.io/v1/virtualmachines"]["get"]
    assert all_ns["operationId"] == "listKubevirtIoV1VirtualMachineForAllNamespaces"
    cluster = doc["paths"]["/api/v1/nodes/{name}"]["get"]
    assert cluster["operationId"] == "readCoreV1Node"
    for ref in set(part.split('"')[0] for part in text.split('"$ref":"#/definitions/')[1:]):
        assert ref in defs, ref


def test_documents_are_json_serializable_and_deterministic(all_resources: list[resources.Resource]) -> None:
    a = orjson.dumps(openapi.openapi_v3(all_resources, "kubevirt.io/v1"))
    b = orjson.dumps(openapi.openapi_v3(list(reversed(all_resources)), "apis/kubevirt.io/v1"))
    assert a == b
    core = openapi.openapi_v3(all_resources, "v1")
    assert "/api/v1/namespaces/{namespace}/pods" in core["paths"]
