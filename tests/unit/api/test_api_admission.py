"""Admission: KubeVirt/CDI/Kubernetes defaulting and webhook validation, on realistic manifests."""

from __future__ import annotations

import base64
import copy
import uuid
from typing import Any

import pytest

from virtplane.api import admission, resources, validation
from virtplane.api.resources import Cause

Served = dict[str, resources.Resource]


def _admit(served: Served, obj: dict[str, Any], old: dict[str, Any] | None = None,
           op: str = "CREATE", **kw: Any) -> list[Cause]:
    """Mutate then validate, as the API server does (plus the schema, to prove defaults stay valid)."""
    res = served[obj["kind"]]
    admission.mutate(res, obj, old, op)
    assert res.schema is not None
    v = validation.compile_schema(res.schema)
    assert v.validate(obj) == [] and v.unknown_fields(obj) == []
    return admission.validate(res, obj, old, op, **kw)


def _by_field(causes: list[Cause]) -> dict[str, Cause]:
    return {c.field: c for c in causes}


# ---- VirtualMachine


def test_vm_cirros_defaults(served: Served, vm_cirros: dict[str, Any]) -> None:
    assert _admit(served, vm_cirros) == []
    tspec = vm_cirros["spec"]["template"]["spec"]
    assert tspec["architecture"] == "amd64"
    assert tspec["domain"]["machine"] == {"type": "q35"}
    assert tspec["domain"]["firmware"]["uuid"] == str(
        uuid.uuid5(uuid.UUID("6a1a24a1-4061-4607-8bf4-a3963d0c5895"), "vm-cirros"))
    assert tspec["domain"]["devices"]["interfaces"] == [{"name": "default", "masquerade": {}}]
    assert tspec["networks"] == [{"name": "default", "pod": {}}]
    # the VM keeps its disks as written (VMI-level defaults happen when the VMI is created)
    assert tspec["domain"]["devices"]["disks"][0] == {"disk": {"bus": "virtio"}, "name": "containerdisk"}


def test_vm_update_keeps_firmware_uuid_and_is_idempotent(served: Served, vm_cirros: dict[str, Any]) -> None:
    admission.mutate(served["VirtualMachine"], vm_cirros, None, "CREATE")
    first = copy.deepcopy(vm_cirros)
    admission.mutate(served["VirtualMachine"], vm_cirros, first, "UPDATE")
    assert vm_cirros == first
    gen = {**first, "metadata": {"generateName": "vm-", "namespace": "default"}}
    gen["spec"] = copy.deepcopy(first["spec"])
    del gen["spec"]["template"]["spec"]["domain"]["firmware"]
    admission.mutate(served["VirtualMachine"], gen, None, "CREATE")
    uuid.UUID(gen["spec"]["template"]["spec"]["domain"]["firmware"]["uuid"])  # random, but a UUID


def test_vm_instancetype_kinds_defaulted(served: Served, vm_cirros: dict[str, Any]) -> None:
    vm_cirros["spec"]["instancetype"] = {"name": "u1.medium"}
    vm_cirros["spec"]["preference"] = {"name": "cirros"}
    admission.mutate(served["VirtualMachine"], vm_cirros, None, "CREATE")
    assert vm_cirros["spec"]["instancetype"]["kind"] == "virtualmachineclusterinstancetype"
    assert vm_cirros["spec"]["preference"]["kind"] == "virtualmachineclusterpreference"


def test_vm_run_strategy_rules(served: Served, vm_cirros: dict[str, Any]) -> None:
    vm = served["VirtualMachine"]
    vm_cirros["spec"]["running"] = True
    assert admission.validate(vm, vm_cirros, None, "CREATE") == [Cause(
        "FieldValueInvalid", "Running and RunStrategy are mutually exclusive. Note that Running is deprecated, "
        "please use RunStrategy instead", "spec.running")]
    del vm_cirros["spec"]["running"]
    vm_cirros["spec"]["runStrategy"] = "Sometimes"
    assert admission.validate(vm, vm_cirros, None, "CREATE") == [
        Cause("FieldValueInvalid", "Invalid RunStrategy (Sometimes)", "spec.runStrategy")]
    del vm_cirros["spec"]["runStrategy"]
    assert admission.validate(vm, vm_cirros, None, "CREATE") == [
        Cause("FieldValueInvalid", "RunStrategy must be specified", "spec.running")]
    for ok in admission.VALID_RUN_STRATEGIES:
        vm_cirros["spec"]["runStrategy"] = ok
        assert admission.validate(vm, vm_cirros, None, "CREATE") == []


def test_vm_missing_template(served: Served) -> None:
    vm = {"kind": "VirtualMachine", "metadata": {"name": "x"}, "spec": {"runStrategy": "Always"}}
    admission.mutate(served["VirtualMachine"], vm, None, "CREATE")
    assert admission.validate(served["VirtualMachine"], vm, None, "CREATE") == [
        Cause("FieldValueRequired", "missing virtual machine template.", "spec.template")]


def test_vm_disk_volume_cross_references(served: Served, vm_cirros: dict[str, Any]) -> None:
    devices = vm_cirros["spec"]["template"]["spec"]["domain"]["devices"]
    devices["disks"].append({"name": "containerdisk", "disk": {"bus": "virtio"}})  # duplicate name
    devices["disks"].append({"name": "orphan", "disk": {"bus": "virtio"}})  # no volume
    devices["disks"][1] = {"name": "cloudinitdisk", "disk": {"bus": "virtio"}, "cdrom": {"bus": "sata"}}
    causes = _by_field(admission.validate(served["VirtualMachine"], vm_cirros, None, "CREATE"))
    p = "spec.template.spec.domain.devices.disks"
    assert causes[f"{p}[2].name"].message == f"{p}[2] and {p}[0] must not have the same Name."
    assert causes[f"{p}[3].name"] == Cause("FieldValueInvalid", f"{p}[3].Name 'orphan' not found.", f"{p}[3].name")
    assert causes[f"{p}[1]"].message == f"{p}[1] can only have a single target type defined"


def test_vm_bus_rules(served: Served, vm_cirros: dict[str, Any]) -> None:
    spec = vm_cirros["spec"]["template"]["spec"]
    spec["volumes"].append({"name": "iso", "persistentVolumeClaim": {"claimName": "iso"}})
    spec["volumes"].append({"name": "legacy", "persistentVolumeClaim": {"claimName": "legacy"}})
    disks = spec["domain"]["devices"]["disks"]
    disks.append({"name": "iso", "cdrom": {"bus": "virtio"}})
    disks.append({"name": "legacy", "disk": {"bus": "ide"}})
    disks[0]["disk"]["bus"] = "nvme"
    causes = _by_field(admission.validate(served["VirtualMachine"], vm_cirros, None, "CREATE"))
    p = "spec.template.spec.domain.devices.disks"
    assert causes[f"{p}[2].cdrom.bus"].message == "Bus type virtio is invalid for CD-ROM device"
    assert causes[f"{p}[3].disk.bus"].message == "IDE bus is not supported"
    assert causes[f"{p}[0].disk.bus"].message == (
        f"{p}[0] is set with an unrecognized bus nvme, must be one of: [virtio scsi sata usb]")


def test_vm_interfaces_and_networks(served: Served, vm_cirros: dict[str, Any]) -> None:
    spec = vm_cirros["spec"]["template"]["spec"]
    spec["domain"]["devices"]["interfaces"] = [
        {"name": "default", "masquerade": {}, "bridge": {}},
        {"name": "secondary", "masquerade": {}},
        {"name": "nowhere", "bridge": {}},
        {"name": "default", "bridge": {}},
    ]
    spec["networks"] = [
        {"name": "default", "pod": {}},
        {"name": "secondary", "multus": {"networkName": "vlan10"}},
        {"name": "unused", "pod": {}},
    ]
    causes = admission.validate(served["VirtualMachine"], vm_cirros, None, "CREATE")
    got = {(c.field, c.message) for c in causes}
    ip = "spec.template.spec.domain.devices.interfaces"
    assert (f"{ip}[0]", f"{ip}[0] can only have a single binding method defined: bridge, masquerade") in got
    assert (f"{ip}[1].name", "Masquerade interface only implemented with pod network") in got
    assert (f"{ip}[2].name", f"{ip}[2].name 'nowhere' not found.") in got
    assert (f"{ip}[3].name", "Only one interface can be connected to one specific network") in got
    assert ("spec.template.spec.networks[2].name", "spec.template.spec.networks[2].name 'unused' not found.") in got
    assert ("spec.template.spec.interfaces",
            "more than one interface is connected to a pod network in spec.template.spec.interfaces") in got


def test_vm_data_volume_templates(served: Served, vm_large: dict[str, Any]) -> None:
    assert _admit(served, vm_large) == []
    dvt = vm_large["spec"]["dataVolumeTemplates"]
    blank = {"source": {"blank": {}}, "storage": {"resources": {"requests": {"storage": "1Gi"}}}}
    dvt.append({"metadata": {"name": "unused-dv"}, "spec": blank})
    dvt.append({"metadata": {"name": "two-sources"},
                "spec": {"source": {"blank": {}, "http": {"url": "http://x/y.img"}}, "pvc": {}}})
    dvt.append({"metadata": {"name": "no-target"}, "spec": {"source": {"blank": {}}}})
    causes = _by_field(admission.validate(served["VirtualMachine"], vm_large, None, "CREATE"))
    assert causes["spec.dataVolumeTemplate[1]"] == Cause(
        "FieldValueRequired", "DataVolumeTemplate entry spec.dataVolumeTemplate[1] must be referenced in the VMI "
        "template's 'volumes' list", "spec.dataVolumeTemplate[1]")
    assert causes["spec.dataVolumeTemplate[2].source"].message == "Multiple dataVolume sources"
    assert causes["spec.dataVolumeTemplate[3].PVC.Storage"].message == "Missing Data volume PVC or Storage"


def test_vm_volume_sources(served: Served, vm_cirros: dict[str, Any]) -> None:
    vols = vm_cirros["spec"]["template"]["spec"]["volumes"]
    vols[0]["emptyDisk"] = {"capacity": "1Gi"}  # two sources
    vols[1]["cloudInitNoCloud"] = {"userData": "x" * 3000}
    causes = _by_field(admission.validate(served["VirtualMachine"], vm_cirros, None, "CREATE"))
    assert causes["spec.template.spec.volumes[0]"].message == \
        "spec.template.spec.volumes[0] must have exactly one source type set"
    assert causes["spec.template.spec.volumes[1].cloudInitNoCloud"].message == (
        "spec.template.spec.volumes[1].cloudInitNoCloud userdata exceeds 2048 byte limit. Should use "
        "UserDataSecretRef for larger data.")


# ---- VirtualMachineInstance


def test_vmi_sata_defaults(served: Served, vmi_sata: dict[str, Any]) -> None:
    assert _admit(served, vmi_sata) == []
    spec = vmi_sata["spec"]
    disks = spec["domain"]["devices"]["disks"]
    assert disks[0]["disk"] == {"bus": "sata"}
    assert disks[2]["cdrom"] == {"bus": "sata", "readonly": True, "tray": "closed"}
    assert spec["domain"]["cpu"] == {"cores": 2, "model": "host-model"}  # sockets unset: no hotplug headroom
    assert spec["domain"]["memory"] == {"guest": "512Mi"}
    assert spec["domain"]["features"] == {"acpi": {"enabled": True}}
    assert spec["domain"]["machine"] == {"type": "q35"} and spec["architecture"] == "amd64"
    uuid.UUID(spec["domain"]["firmware"]["uuid"])
    assert spec["volumes"][0]["containerDisk"]["imagePullPolicy"] == "IfNotPresent"
    assert spec["terminationGracePeriodSeconds"] == admission.DEFAULT_VMI_GRACE_PERIOD
    assert spec["networks"] == [{"name": "default", "pod": {}}]
    assert vmi_sata["status"]["memory"] == {"guestAtBoot": "512Mi", "guestCurrent": "512Mi",
                                            "guestRequested": "512Mi"}


def test_vmi_defaults_from_nothing(served: Served) -> None:
    vmi = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
           "metadata": {"name": "tiny", "namespace": "default"},
           "spec": {"domain": {"devices": {}, "resources": {"limits": {"memory": "64Mi", "cpu": "2"}}},
                    "volumes": [{"name": "root", "containerDisk": {"image": "quay.io/kubevirt/cirros"}}]}}
    assert _admit(served, vmi) == []
    domain = vmi["spec"]["domain"]
    assert domain["resources"]["requests"] == {"memory": "64Mi", "cpu": "2"}
    assert domain["memory"]["guest"] == "64Mi"
    assert domain["cpu"] == {"sockets": 2, "cores": 1, "threads": 1, "model": "host-model", "maxSockets": 8}
    assert domain["devices"]["disks"] == [{"name": "root", "disk": {"bus": admission.DEFAULT_DISK_BUS}}]
    assert vmi["spec"]["volumes"][0]["containerDisk"]["imagePullPolicy"] == "Always"
    assert vmi["status"]["currentCPUTopology"] == {"sockets": 2, "cores": 1, "threads": 1}


def test_vmi_memory_required(served: Served) -> None:
    vmi = {"kind": "VirtualMachineInstance", "metadata": {"name": "x", "namespace": "d"},
           "spec": {"domain": {"devices": {"disks": [{"name": "r", "disk": {"bus": "virtio"}}]}},
                    "volumes": [{"name": "r", "containerDisk": {"image": "img:1"}}]}}
    causes = _admit(served, vmi)
    assert causes == [Cause(
        "FieldValueRequired", "no memory requested, at least one of 'spec.domain.memory.guest', "
        "'spec.domain.memory.hugepages.size' or 'spec.domain.resources.requests.memory' must be set", "")]


def test_vmi_efi(served: Served, vmi_efi: dict[str, Any]) -> None:
    assert _admit(served, copy.deepcopy(vmi_efi)) == []
    assert vmi_efi["spec"]["domain"]["memory"]["guest"] == "1Gi"
    no_smm = copy.deepcopy(vmi_efi)
    del no_smm["spec"]["domain"]["features"]
    assert _admit(served, no_smm) == [Cause(
        "FieldValueInvalid", "spec.domain has EFI SecureBoot enabled. SecureBoot requires SMM, which is currently "
        "disabled.", "spec.domain")]
    plain_efi = copy.deepcopy(no_smm)
    plain_efi["spec"]["domain"]["firmware"]["bootloader"]["efi"] = {"secureBoot": False}
    assert admission.validate(served["VirtualMachineInstance"], plain_efi, None, "CREATE") == []
    both = copy.deepcopy(vmi_efi)
    both["spec"]["domain"]["firmware"]["bootloader"]["bios"] = {}
    assert _admit(served, both) == [Cause(
        "FieldValueInvalid", "spec.domain.firmware.bootloader has both EFI and BIOS configured, but they are "
        "mutually exclusive.", "spec.domain.firmware.bootloader")]


def test_vmi_volume_without_disk_and_reserved_labels(served: Served, vmi_efi: dict[str, Any]) -> None:
    vmi = served["VirtualMachineInstance"]
    vmi_efi["spec"]["volumes"].append({"name": "extra", "emptyDisk": {"capacity": "1Gi"}})
    vmi_efi["metadata"]["labels"] = {"kubevirt.io/nodeName": "node1"}
    # (no mutate: the default-disk rule would add the missing disk)
    causes = _by_field(admission.validate(vmi, vmi_efi, None, "CREATE"))
    assert causes["spec.domain.volumes[1].name"].message == "spec.domain.volumes[1].name 'extra' not found."
    assert causes["metadata.labels"].type == "FieldValueNotSupported"
    assert "metadata.labels" not in _by_field(admission.validate(vmi, vmi_efi, None, "CREATE", privileged=True))


def test_vmi_spec_is_immutable_for_users(served: Served, vmi_sata: dict[str, Any]) -> None:
    vmi = served["VirtualMachineInstance"]
    admission.mutate(vmi, vmi_sata, None, "CREATE")
    old = copy.deepcopy(vmi_sata)
    vmi_sata["metadata"]["labels"] = {"app": "x"}
    vmi_sata["status"]["phase"] = "Running"
    assert admission.validate(vmi, vmi_sata, old, "UPDATE") == []
    vmi_sata["spec"]["domain"]["cpu"]["cores"] = 4
    assert admission.validate(vmi, vmi_sata, old, "UPDATE") == [
        Cause("FieldValueNotSupported", "update of VMI object is restricted", "spec")]
    assert admission.validate(vmi, vmi_sata, old, "UPDATE", privileged=True) == []


# ---- migrations, policies


def test_vmim(served: Served) -> None:
    mig = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
           "metadata": {"name": "migration-job", "namespace": "default"}, "spec": {"vmiName": "vmi-fedora"}}
    assert _admit(served, mig) == []
    assert mig["metadata"]["labels"] == {"kubevirt.io/vmi-name": "vmi-fedora"}
    assert mig["metadata"]["finalizers"] == ["kubevirt.io/migrationJobFinalize"]
    res = served["VirtualMachineInstanceMigration"]
    assert admission.validate(res, {"spec": {}}, None, "CREATE") == [
        Cause("FieldValueRequired", "vmiName is missing", "spec.vmiName")]
    changed = copy.deepcopy(mig)
    changed["spec"]["vmiName"] = "other"
    assert admission.validate(res, changed, mig, "UPDATE")[0].message == \
        "update of Migration object's spec is restricted"


def test_migration_policy(served: Served) -> None:
    res = served["MigrationPolicy"]
    policy = {"spec": {"allowAutoConverge": True, "bandwidthPerMigration": "-1Mi", "completionTimeoutPerGiB": -5}}
    assert admission.validate(res, policy, None, "CREATE") == [
        Cause("FieldValueInvalid", "must not be negative", "spec.completionTimeoutPerGiB"),
        Cause("FieldValueInvalid", "must not be negative", "spec.bandwidthPerMigration"),
    ]
    policy["spec"] = {"bandwidthPerMigration": "64Mi", "completionTimeoutPerGiB": 800}
    assert admission.validate(res, policy, None, "CREATE") == []


# ---- DataVolume


def test_dv_http(served: Served, dv_http: dict[str, Any]) -> None:
    assert _admit(served, dv_http) == []
    res = served["DataVolume"]

    def check(mutate: Any) -> list[Cause]:
        dv = copy.deepcopy(dv_http)
        mutate(dv["spec"])
        return admission.validate(res, dv, None, "CREATE")

    assert check(lambda s: s.update(sourceRef={"kind": "DataSource", "name": "fedora"})) == [
        Cause("FieldValueInvalid", "Data volume should have either Source or SourceRef", "spec.source")]
    assert check(lambda s: s.update(pvc={"accessModes": ["ReadWriteOnce"]})) == [
        Cause("FieldValueInvalid", "Duplicate storage definition, both target storage and target pvc defined",
              "spec.PVC.Storage")]
    assert check(lambda s: s.pop("storage")) == [Cause("FieldValueInvalid", "Missing Data volume PVC", "spec.PVC")]
    assert check(lambda s: s["source"].update(blank={})) == [
        Cause("FieldValueInvalid", "Multiple Data volume sources", "spec.source")]
    assert check(lambda s: s.update(source={})) == [
        Cause("FieldValueInvalid", "Missing Data volume source", "spec.source")]
    assert check(lambda s: s["source"]["http"].update(url="ftp://example.com/disk.img")) == [
        Cause("FieldValueInvalid", "spec.source Invalid source URL scheme: ftp://example.com/disk.img",
              "spec.source.HTTP.url")]
    assert check(lambda s: s.update(contentType="tarball"))[0].message == "ContentType not one of: kubevirt, archive"
    assert check(lambda s: s.update(pvc={"resources": {"requests": {"storage": "1Gi"}}}) or s.pop("storage")) == [
        Cause("FieldValueInvalid", "Required value: at least 1 access mode is required", "spec.PVC.accessModes")]
    assert check(lambda s: s.update(sourceRef={"kind": "PVC", "name": "x"}) or s.pop("source")) == [
        Cause("FieldValueInvalid", "Unsupported sourceRef kind PVC, currently only DataSource is supported",
              "spec.sourceRef.Kind")]


def test_dv_spec_immutable(served: Served, dv_http: dict[str, Any]) -> None:
    res = served["DataVolume"]
    new = copy.deepcopy(dv_http)
    new["metadata"]["labels"] = {"a": "b"}
    assert admission.validate(res, new, dv_http, "UPDATE") == []
    new["spec"]["storage"]["resources"]["requests"]["storage"] = "10Gi"
    assert admission.validate(res, new, dv_http, "UPDATE") == [
        Cause("FieldValueDuplicate", "Cannot update DataVolume Spec", "DataVolume.Spec")]


# ---- Kubernetes kinds


def test_namespace_and_pod_defaults(served: Served) -> None:
    ns = {"kind": "Namespace", "metadata": {"name": "team-a"}}
    assert _admit(served, ns) == []
    assert ns["spec"] == {"finalizers": ["kubernetes"]} and ns["status"] == {"phase": "Active"}
    pod = {"kind": "Pod", "metadata": {"name": "p", "namespace": "d"},
           "spec": {"containers": [{"name": "c", "image": "busybox", "ports": [{"containerPort": 80}]}]}}
    assert _admit(served, pod) == []
    spec = pod["spec"]
    assert (spec["restartPolicy"], spec["dnsPolicy"], spec["terminationGracePeriodSeconds"],
            spec["schedulerName"], spec["serviceAccountName"]) == (
        "Always", "ClusterFirst", 30, "default-scheduler", "default")
    c = spec["containers"][0]
    assert (c["imagePullPolicy"], c["terminationMessagePath"], c["ports"][0]["protocol"]) == (
        "Always", "/dev/termination-log", "TCP")


def test_pod_spec_update_rules(served: Served) -> None:
    res = served["Pod"]
    old = {"spec": {"containers": [{"name": "c", "image": "a:1"}]}}
    bound = copy.deepcopy(old)
    bound["spec"]["nodeName"] = "node1"
    assert admission.validate(res, bound, old, "UPDATE") == []  # binding
    new_image = copy.deepcopy(bound)
    new_image["spec"]["containers"][0]["image"] = "a:2"
    assert admission.validate(res, new_image, bound, "UPDATE") == []
    moved = copy.deepcopy(bound)
    moved["spec"]["nodeName"] = "node2"
    (c,) = admission.validate(res, moved, bound, "UPDATE")
    assert c.field == "spec" and c.message.startswith("Forbidden: pod updates may not change fields other than")


def test_secret_string_data_and_keys(served: Served) -> None:
    secret = {"kind": "Secret", "metadata": {"name": "s", "namespace": "d"}, "stringData": {"password": "hunter2"}}
    assert _admit(served, secret) == []
    assert secret["type"] == "Opaque" and "stringData" not in secret
    assert base64.b64decode(secret["data"]["password"]) == b"hunter2"
    bad = {"kind": "Secret", "data": {"bad key": "aGk=", "ok": "%%%"}}
    fields = [c.field for c in admission.validate(served["Secret"], bad, None, "CREATE")]
    assert fields == ["data[bad key]", "data[ok]"]


def test_immutable_configmap(served: Served) -> None:
    res = served["ConfigMap"]
    old = {"data": {"a": "1"}, "immutable": True}
    new = {"data": {"a": "2"}, "immutable": True}
    assert admission.validate(res, new, old, "UPDATE") == [
        Cause("FieldValueForbidden", "Forbidden: field is immutable when `immutable` is set", "data")]


def test_storage_class(served: Served) -> None:
    res = served["StorageClass"]
    sc = {"kind": "StorageClass", "metadata": {"name": "local"}, "provisioner": "virtplane.io/local"}
    assert _admit(served, sc) == []
    assert (sc["reclaimPolicy"], sc["volumeBindingMode"]) == ("Delete", "Immediate")
    changed = {**sc, "provisioner": "other", "volumeBindingMode": "WaitForFirstConsumer"}
    assert [c.field for c in admission.validate(res, changed, sc, "UPDATE")] == ["provisioner", "volumeBindingMode"]
    assert admission.validate(res, {**sc, "provisioner": ""}, None, "CREATE") == [
        Cause("FieldValueRequired", "Required value", "provisioner")]


def test_pvc(served: Served) -> None:
    res = served["PersistentVolumeClaim"]
    pvc = {"kind": "PersistentVolumeClaim", "metadata": {"name": "c", "namespace": "d"},
           "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
    assert _admit(served, pvc) == []
    assert pvc["spec"]["volumeMode"] == "Filesystem" and pvc["status"] == {"phase": "Pending"}
    bad = {"spec": {"accessModes": ["ReadWriteSometimes"], "resources": {}}}
    assert admission.validate(res, bad, None, "CREATE") == [
        Cause("FieldValueNotSupported", 'Unsupported value: "ReadWriteSometimes": supported values: "ReadOnlyMany", '
              '"ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod"', "spec.accessModes"),
        Cause("FieldValueRequired", "Required value", "spec.resources[storage]"),
    ]
    bound = copy.deepcopy(pvc)
    bound["spec"]["volumeName"] = "pv-1"
    assert admission.validate(res, bound, pvc, "UPDATE") == []
    grown = copy.deepcopy(bound)
    grown["spec"]["resources"]["requests"]["storage"] = "2Gi"
    assert admission.validate(res, grown, bound, "UPDATE") == []
    changed = copy.deepcopy(bound)
    changed["spec"]["accessModes"] = ["ReadWriteMany"]
    assert admission.validate(res, changed, bound, "UPDATE")[0].field == "spec"


def test_deployment_selector(served: Served) -> None:
    dep = {"kind": "Deployment", "metadata": {"name": "web", "namespace": "d"},
           "spec": {"selector": {"matchLabels": {"app": "web"}},
                    "template": {"metadata": {"labels": {"app": "api"}}, "spec": {"containers": [{"name": "c"}]}}}}
    (c,) = _admit(served, dep)
    assert c.field == "spec.template.metadata.labels" and c.message.endswith(
        "`selector` does not match template `labels`")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "RollingUpdate"


@pytest.mark.parametrize("kind", ["VirtualMachine", "DataVolume", "Pod"])
def test_objects_being_deleted_are_left_alone(served: Served, kind: str) -> None:
    obj = {"kind": kind, "metadata": {"name": "x", "deletionTimestamp": "2026-08-01T00:00:00Z"}, "spec": {}}
    before = copy.deepcopy(obj)
    admission.mutate(served[kind], obj, None, "CREATE")
    assert obj == before
    assert admission.validate(served[kind], obj, None, "CREATE") == []


def test_registries_are_read_only() -> None:
    with pytest.raises(TypeError):
        admission.VALIDATORS[("x", "Y")] = ()  # type: ignore[index]
