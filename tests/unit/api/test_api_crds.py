"""The generated CRDs: up to date, structural, and named/shaped as KubeVirt's and CDI's real ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from virtplane.api import builtin, gen_crds, resources

SHARED = Path(__file__).resolve().parents[3].parent / "shared"


@pytest.fixture(scope="module")
def crds() -> dict[str, dict[str, Any]]:
    return {c["spec"]["names"]["kind"]: c for c in builtin.bundled_crds()}


def _schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.skipif(not (SHARED / "api-specs").is_dir(), reason="../shared/api-specs not available")
def test_committed_data_matches_generator(tmp_path: Path) -> None:
    assert gen_crds.main(["--shared", str(SHARED), "--out", str(tmp_path)]) == 0
    for name in (gen_crds.CRDS_FILE, gen_crds.META_FILE):
        fresh = (tmp_path / name).read_text()
        committed = (gen_crds.DATA_DIR / name).read_text()
        assert fresh == committed, f"{name} is stale: run `python -m virtplane.api.gen_crds`"
    # and generation is deterministic
    assert gen_crds.generate(SHARED) == gen_crds.generate(SHARED)


def test_every_requested_kind_is_bundled(crds: dict[str, dict[str, Any]]) -> None:
    expected = {
        "VirtualMachine": "kubevirt.io", "VirtualMachineInstance": "kubevirt.io",
        "VirtualMachineInstanceMigration": "kubevirt.io", "VirtualMachineInstanceReplicaSet": "kubevirt.io",
        "VirtualMachineInstancePreset": "kubevirt.io", "KubeVirt": "kubevirt.io",
        "DataVolume": "cdi.kubevirt.io", "DataSource": "cdi.kubevirt.io", "DataImportCron": "cdi.kubevirt.io",
        "StorageProfile": "cdi.kubevirt.io", "CDI": "cdi.kubevirt.io", "CDIConfig": "cdi.kubevirt.io",
        "VirtualMachineInstancetype": "instancetype.kubevirt.io",
        "VirtualMachineClusterInstancetype": "instancetype.kubevirt.io",
        "VirtualMachinePreference": "instancetype.kubevirt.io",
        "VirtualMachineClusterPreference": "instancetype.kubevirt.io",
        "MigrationPolicy": "migrations.kubevirt.io",
        "VirtualMachineSnapshot": "snapshot.kubevirt.io", "VirtualMachineSnapshotContent": "snapshot.kubevirt.io",
        "VirtualMachineRestore": "snapshot.kubevirt.io", "VirtualMachineClone": "clone.kubevirt.io",
        "VirtualMachinePool": "pool.kubevirt.io", "VirtualMachineExport": "export.kubevirt.io",
        "NetworkAttachmentDefinition": "k8s.cni.cncf.io",
    }
    assert {k: c["spec"]["group"] for k, c in crds.items()} == expected
    for crd in crds.values():
        names = crd["spec"]["names"]
        assert crd["metadata"]["name"] == f"{names['plural']}.{crd['spec']['group']}"
        assert names["listKind"] == names["kind"] + "List"


@pytest.mark.parametrize(
    ("kind", "short", "categories", "scope"),
    [
        ("VirtualMachine", ["vm", "vms"], ["all"], "Namespaced"),
        ("VirtualMachineInstance", ["vmi", "vmis"], ["all"], "Namespaced"),
        ("VirtualMachineInstanceMigration", ["vmim", "vmims"], ["all"], "Namespaced"),
        ("VirtualMachineInstanceReplicaSet", ["vmirs", "vmirss"], ["all"], "Namespaced"),
        ("KubeVirt", ["kv", "kvs"], ["all"], "Namespaced"),
        ("DataVolume", ["dv", "dvs"], ["all"], "Namespaced"),
        ("DataSource", ["das"], ["all"], "Namespaced"),
        ("DataImportCron", ["dic", "dics"], ["all"], "Namespaced"),
        ("CDI", ["cdi", "cdis"], None, "Cluster"),
        ("StorageProfile", None, None, "Cluster"),
        ("VirtualMachineInstancetype", ["vminstancetype", "vminstancetypes", "vmf", "vmfs"], ["all"], "Namespaced"),
        ("VirtualMachineClusterInstancetype", ["vmclusterinstancetype", "vmclusterinstancetypes", "vmcf", "vmcfs"],
         None, "Cluster"),
        ("VirtualMachinePreference", ["vmpref", "vmprefs", "vmp", "vmps"], ["all"], "Namespaced"),
        ("VirtualMachineClusterPreference", ["vmcp", "vmcps"], None, "Cluster"),
        ("MigrationPolicy", None, None, "Cluster"),
        ("VirtualMachineClone", ["vmclone", "vmclones"], ["all"], "Namespaced"),
        ("VirtualMachinePool", ["vmpool", "vmpools"], ["all"], "Namespaced"),
        ("VirtualMachineExport", ["vmexport", "vmexports"], ["all"], "Namespaced"),
        ("NetworkAttachmentDefinition", ["net-attach-def"], None, "Namespaced"),
    ],
)
def test_names_and_scope(crds: dict[str, dict[str, Any]], kind: str, short: list[str] | None,
                         categories: list[str] | None, scope: str) -> None:
    spec = crds[kind]["spec"]
    assert spec["names"].get("shortNames") == short
    assert spec["names"].get("categories") == categories
    assert spec["scope"] == scope


def test_printer_columns_as_upstream(crds: dict[str, dict[str, Any]]) -> None:
    def cols(kind: str) -> list[tuple[str, str, str, int]]:
        v = crds[kind]["spec"]["versions"][0]
        return [(c["name"], c["type"], c["jsonPath"], c.get("priority", 0))
                for c in v.get("additionalPrinterColumns", [])]

    ready = ".status.conditions[?(@.type=='Ready')].status"
    assert cols("VirtualMachine") == [("Age", "date", ".metadata.creationTimestamp", 0),
                                      ("Status", "string", ".status.printableStatus", 0),
                                      ("Ready", "string", ready, 0)]
    assert cols("VirtualMachineInstance") == [
        ("Age", "date", ".metadata.creationTimestamp", 0), ("Phase", "string", ".status.phase", 0),
        ("IP", "string", ".status.interfaces[0].ipAddress", 0), ("NodeName", "string", ".status.nodeName", 0),
        ("Ready", "string", ready, 0),
        ("Live-Migratable", "string", ".status.conditions[?(@.type=='LiveMigratable')].status", 1),
        ("Paused", "string", ".status.conditions[?(@.type=='Paused')].status", 1),
    ]
    assert cols("VirtualMachineInstanceMigration") == [("Phase", "string", ".status.phase", 0),
                                                       ("VMI", "string", ".spec.vmiName", 0)]
    assert cols("DataVolume") == [("Phase", "string", ".status.phase", 0),
                                  ("Progress", "string", ".status.progress", 0),
                                  ("Restarts", "integer", ".status.restartCount", 0),
                                  ("Age", "date", ".metadata.creationTimestamp", 0)]
    assert [c[0] for c in cols("VirtualMachinePool")] == ["Desired", "Current", "Ready", "Age"]


def test_subresources_as_upstream(crds: dict[str, dict[str, Any]]) -> None:
    def sub(kind: str) -> dict[str, Any]:
        return crds[kind]["spec"]["versions"][0].get("subresources", {})

    assert sub("VirtualMachine") == {"status": {}}
    assert sub("VirtualMachineInstance") == {}  # KubeVirt's VMI CRD has no status subresource
    scale = {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
             "labelSelectorPath": ".status.labelSelector"}
    assert sub("VirtualMachineInstanceReplicaSet") == {"status": {}, "scale": scale}
    assert sub("VirtualMachinePool") == {"status": {}, "scale": scale}
    assert sub("DataVolume") == {"status": {}}


def _walk(node: dict[str, Any], path: str, out: list[str]) -> None:
    if "$ref" in node or "default" in node:
        out.append(f"{path}: $ref/default")
    if not (isinstance(node.get("type"), str) or node.get("x-kubernetes-int-or-string")
            or node.get("x-kubernetes-preserve-unknown-fields")):
        out.append(f"{path}: untyped")
    for k, v in node.get("properties", {}).items():
        _walk(v, f"{path}.{k}", out)
    if isinstance(node.get("additionalProperties"), dict):
        _walk(node["additionalProperties"], f"{path}[*]", out)
    if "items" in node:
        _walk(node["items"], f"{path}[]", out)


def test_schemas_are_structural(crds: dict[str, dict[str, Any]]) -> None:
    problems: list[str] = []
    for kind, crd in crds.items():
        schema = _schema(crd)
        assert schema["properties"]["metadata"] == {"type": "object"}, kind
        _walk(schema, kind, problems)
    assert problems == []


def test_schema_details(crds: dict[str, dict[str, Any]]) -> None:
    vm = _schema(crds["VirtualMachine"])
    spec = vm["properties"]["spec"]
    assert "Running state indicates" in spec["properties"]["runStrategy"]["description"]
    tmpl_meta = spec["properties"]["template"]["properties"]["metadata"]
    assert tmpl_meta == {"type": "object", "nullable": True, "x-kubernetes-preserve-unknown-fields": True}
    domain = spec["properties"]["template"]["properties"]["spec"]["properties"]["domain"]
    mem = domain["properties"]["resources"]["properties"]["requests"]["additionalProperties"]
    assert mem["x-kubernetes-int-or-string"] is True and mem["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    # Probe ports are int-or-string in KubeVirt's spec (written as a type list there).
    probe_port = (spec["properties"]["template"]["properties"]["spec"]["properties"]["readinessProbe"]
                  ["properties"]["tcpSocket"]["properties"]["port"])
    assert probe_port["x-kubernetes-int-or-string"] is True
    # The snapshot content embeds snapshot.kubevirt.io's VirtualMachine, not kubevirt.io's (same Go name).
    content = _schema(crds["VirtualMachineSnapshotContent"])
    embedded_vm = content["properties"]["spec"]["properties"]["source"]["properties"]["virtualMachine"]
    assert "template" in embedded_vm["properties"]["spec"]["properties"]
    dv = _schema(crds["DataVolume"])
    assert set(dv["properties"]["spec"]["properties"]["source"]["properties"]) >= {"http", "registry", "pvc", "blank"}


def test_resources_from_crd(crds: dict[str, dict[str, Any]]) -> None:
    (vm,) = builtin.resources_from_crd(crds["VirtualMachine"])
    assert (vm.group, vm.version, vm.kind, vm.plural, vm.singular) == (
        "kubevirt.io", "v1", "VirtualMachine", "virtualmachines", "virtualmachine")
    assert vm.namespaced and vm.from_crd and vm.status_subresource and vm.scale is None
    assert vm.short_names == ("vm", "vms") and vm.categories == ("all",)
    assert vm.list_kind == "VirtualMachineList"
    assert vm.printer_columns[1] == resources.PrinterColumn(
        "Status", "string", ".status.printableStatus", "Human Readable Status")
    assert vm.schema is _schema(crds["VirtualMachine"])
    (rs,) = builtin.resources_from_crd(crds["VirtualMachineInstanceReplicaSet"])
    assert rs.scale == (".spec.replicas", ".status.replicas", ".status.labelSelector")
    (vmi,) = builtin.resources_from_crd(crds["VirtualMachineInstance"])
    assert not vmi.status_subresource
    (mp,) = builtin.resources_from_crd(crds["MigrationPolicy"])
    assert not mp.namespaced


def test_resources_from_crd_versions() -> None:
    crd = {
        "spec": {
            "group": "example.com", "scope": "Cluster",
            "names": {"kind": "Widget", "plural": "widgets"},
            "versions": [
                {"name": "v1", "served": True, "storage": True,
                 "schema": {"openAPIV3Schema": {"type": "object"}},
                 "additionalPrinterColumns": [{"name": "Size", "type": "integer", "jsonPath": ".spec.size",
                                               "priority": 1}]},
                {"name": "v1beta1", "served": False, "storage": False},
                {"name": "v2alpha1", "served": True, "storage": False},
            ],
        }
    }
    out = builtin.resources_from_crd(crd)
    assert [r.version for r in out] == ["v1", "v2alpha1"]
    assert out[0].singular == "widget" and out[0].list_kind == "WidgetList" and not out[0].namespaced
    assert out[0].printer_columns == (resources.PrinterColumn("Size", "integer", ".spec.size", priority=1),)
    assert not out[0].status_subresource and out[1].schema is None


def test_bundled_crds_are_fresh_copies() -> None:
    a, b = builtin.bundled_crds(), builtin.bundled_crds()
    a[0]["metadata"]["name"] = "mutated"
    assert b[0]["metadata"]["name"] != "mutated"
