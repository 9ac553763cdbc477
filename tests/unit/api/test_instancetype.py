"""Instance type / preference expansion (virtplane.api.instancetype) and the VM admission conflict rule."""

from __future__ import annotations

import copy

import pytest

from virtplane.api import admission, instancetype
from virtplane.api.resources import Resource
from virtplane.cli import instancetypes as common

U1_SMALL = {"cpu": {"guest": 1}, "memory": {"guest": "2Gi"}}
U1_XLARGE = {"cpu": {"guest": 4}, "memory": {"guest": "16Gi"}}


def _vmi(spec: dict | None = None) -> dict:
    return {"metadata": {"name": "v", "namespace": "default"},
            "spec": spec or {"domain": {"devices": {"disks": [{"name": "root"}],
                                                    "interfaces": [{"name": "default"}]}},
                             "networks": [{"name": "default", "pod": {}}],
                             "volumes": [{"name": "root", "containerDisk": {"image": "x"}}]}}


def test_instancetype_sets_guest_cpu_and_memory_and_annotations() -> None:
    vmi = instancetype.expand_vmi(_vmi(), {"instancetype": {"name": "u1.small"}}, U1_SMALL, None)
    domain = vmi["spec"]["domain"]
    assert domain["cpu"] == {"sockets": 1, "cores": 1, "threads": 1}
    assert domain["memory"] == {"guest": "2Gi"}
    assert vmi["metadata"]["annotations"] == {"kubevirt.io/cluster-instancetype-name": "u1.small"}


@pytest.mark.parametrize(("topology", "expected"), [
    (None, (4, 1, 1)), ("preferSockets", (4, 1, 1)), ("cores", (1, 4, 1)), ("preferThreads", (1, 1, 4)),
    ("spread", (2, 2, 1)), ("any", (4, 1, 1)),
])
def test_preferred_cpu_topology(topology: str | None, expected: tuple[int, int, int]) -> None:
    pref = {"cpu": {"preferredCPUTopology": topology}} if topology else {}
    vmi = instancetype.expand_vmi(_vmi(), {"instancetype": {"name": "u1.xlarge"}, "preference": {"name": "p"}},
                                  U1_XLARGE, pref)
    cpu = vmi["spec"]["domain"]["cpu"]
    assert (cpu["sockets"], cpu["cores"], cpu["threads"]) == expected


def test_spread_across_cores_threads_and_indivisible_vcpus() -> None:
    pref = {"cpu": {"preferredCPUTopology": "spread", "spreadOptions": {"across": "CoresThreads"}}}
    assert instancetype.guest_topology(4, pref) == (1, 2, 2)
    with pytest.raises(instancetype.ExpansionError, match="1 vCPUs provided by the instance type are not divisible"):
        instancetype.expand_vmi(_vmi(), {"instancetype": {"name": "u1.small"}}, U1_SMALL,
                                {"cpu": {"preferredCPUTopology": "spread"}})


def test_overcommit_and_optional_instancetype_fields() -> None:
    it = {"cpu": {"guest": 2, "model": "host-passthrough", "dedicatedCPUPlacement": True},
          "memory": {"guest": "4Gi", "overcommitPercent": 50, "hugepages": {"pageSize": "2Mi"}},
          "nodeSelector": {"disk": "ssd"}, "ioThreadsPolicy": "auto", "annotations": {"team": "a"}}
    vmi = instancetype.expand_vmi(_vmi(), {"instancetype": {"name": "x", "kind": "VirtualMachineInstancetype"}},
                                  it, None)
    spec = vmi["spec"]
    assert spec["domain"]["cpu"]["model"] == "host-passthrough"
    assert spec["domain"]["cpu"]["dedicatedCpuPlacement"] is True
    assert spec["domain"]["resources"]["requests"]["memory"] == str(2 * 1024**3)
    assert spec["domain"]["memory"]["hugepages"] == {"pageSize": "2Mi"}
    assert spec["nodeSelector"] == {"disk": "ssd"} and spec["domain"]["ioThreadsPolicy"] == "auto"
    assert vmi["metadata"]["annotations"] == {"kubevirt.io/instancetype-name": "x", "team": "a"}


def test_conflicts_name_every_field_the_vm_sets_itself() -> None:
    vmi = _vmi()
    vmi["spec"]["domain"].update({"cpu": {"cores": 2}, "resources": {"requests": {"cpu": "1"}}})
    vmi["spec"]["nodeSelector"] = {"a": "b"}
    it = {**U1_SMALL, "nodeSelector": {"c": "d"}}
    with pytest.raises(instancetype.ExpansionError) as exc:
        instancetype.expand_vmi(vmi, {"instancetype": {"name": "u1.small"}}, it, None)
    assert str(exc.value) == ("VMI conflicts with instancetype spec in fields: [spec.nodeSelector, "
                              "spec.domain.resources.requests.cpu, spec.domain.cpu.cores]")
    vmi = _vmi()
    vmi["spec"]["domain"]["memory"] = {"guest": "1Gi"}
    with pytest.raises(instancetype.ExpansionError, match=r"\[spec.domain.memory.guest\]"):
        instancetype.expand_vmi(vmi, {"instancetype": {"name": "u1.small"}}, U1_SMALL, None)


def test_preference_fills_only_what_the_vm_leaves_unset() -> None:
    vmi = _vmi()
    vmi["spec"]["domain"]["devices"]["disks"].append({"name": "data", "disk": {"bus": "sata"}})
    vmi["spec"]["domain"]["devices"]["disks"].append({"name": "iso", "cdrom": {}})
    vmi["spec"]["domain"]["devices"]["interfaces"].append({"name": "second", "model": "e1000"})
    pref = {"devices": {"preferredDiskBus": "virtio", "preferredCdromBus": "sata", "preferredInterfaceModel": "virtio",
                        "preferredRng": {}, "preferredAutoattachSerialConsole": True},
            "firmware": {"preferredEfi": {"secureBoot": False}},
            "features": {"preferredSmm": {}, "preferredHyperv": {"relaxed": {}}},
            "machine": {"preferredMachineType": "pc-q35-rhel9.2.0"},
            "clock": {"preferredClockOffset": {"utc": {}}, "preferredTimer": {"hpet": {"present": False}}},
            "preferredTerminationGracePeriodSeconds": 60, "annotations": {"os": "fedora"}}
    out = instancetype.expand_vmi(vmi, {"preference": {"name": "fedora"}}, None, pref)
    spec = out["spec"]
    devices = spec["domain"]["devices"]
    assert [d.get("disk", d.get("cdrom")) for d in devices["disks"]] == [{"bus": "virtio"}, {"bus": "sata"},
                                                                        {"bus": "sata"}]
    assert [i["model"] for i in devices["interfaces"]] == ["virtio", "e1000"]
    assert devices["rng"] == {} and devices["autoattachSerialConsole"] is True
    assert spec["domain"]["firmware"]["bootloader"] == {"efi": {"secureBoot": False}}
    assert spec["domain"]["features"] == {"smm": {}, "hyperv": {"relaxed": {}}}
    assert spec["domain"]["machine"] == {"type": "pc-q35-rhel9.2.0"}
    assert spec["domain"]["clock"] == {"utc": {}, "timer": {"hpet": {"present": False}}}
    assert spec["terminationGracePeriodSeconds"] == 60
    assert out["metadata"]["annotations"] == {"kubevirt.io/cluster-preference-name": "fedora", "os": "fedora"}
    # the VM's own choices win
    vmi = _vmi()
    vmi["spec"]["domain"]["firmware"] = {"bootloader": {"bios": {}}}
    vmi["spec"]["domain"]["machine"] = {"type": "q35"}
    out = instancetype.expand_vmi(vmi, {"preference": {"name": "p"}}, None, pref)
    assert out["spec"]["domain"]["firmware"]["bootloader"] == {"bios": {}}
    assert out["spec"]["domain"]["machine"] == {"type": "q35"}


def test_preference_requirements() -> None:
    pref = {"requirements": {"cpu": {"guest": 2}, "memory": {"guest": "4Gi"}}}
    with pytest.raises(instancetype.ExpansionError, match="insufficient CPU resources of 1 vCPU provided by "
                                                          "instance type, preference requires 2 vCPU"):
        instancetype.expand_vmi(_vmi(), {"instancetype": {"name": "u1.small"}, "preference": {"name": "w"}},
                                U1_SMALL, pref)
    with pytest.raises(instancetype.ExpansionError, match="insufficient Memory resources of 2Gi"):
        instancetype.expand_vmi(_vmi(), {"instancetype": {"name": "x"}, "preference": {"name": "w"}},
                                {"cpu": {"guest": 2}, "memory": {"guest": "2Gi"}}, pref)
    instancetype.expand_vmi(_vmi(), {"instancetype": {"name": "x"}, "preference": {"name": "w"}}, U1_XLARGE, pref)


def test_kinds_and_revisions() -> None:
    assert instancetype.kind_of({"name": "a"}, preference=False) == "VirtualMachineClusterInstancetype"
    assert instancetype.kind_of({"name": "a", "kind": "virtualmachinepreference"},
                                preference=True) == "VirtualMachinePreference"
    with pytest.raises(instancetype.ExpansionError, match="unexpected kind in InstancetypeMatcher: Foo"):
        instancetype.kind_of({"name": "a", "kind": "Foo"}, preference=False)
    vm = {"metadata": {"name": "vm1", "namespace": "ns", "uid": "u-vm"}}
    obj = {"apiVersion": "instancetype.kubevirt.io/v1beta1", "kind": "VirtualMachineClusterInstancetype",
           "metadata": {"name": "u1.small", "uid": "abc", "generation": 1, "labels": {"x": "y"}}, "spec": U1_SMALL}
    rev = instancetype.controller_revision(vm, obj, {"kind": "VirtualMachine", "name": "vm1", "uid": "u-vm"})
    assert rev["metadata"]["name"] == "vm1-u1.small-v1beta1-abc-1"
    assert rev["metadata"]["labels"]["instancetype.kubevirt.io/object-kind"] == "VirtualMachineClusterInstancetype"
    assert "labels" not in rev["data"]["metadata"]
    assert instancetype.spec_from_revision(rev) == U1_SMALL
    assert instancetype.same_revision_data(rev, copy.deepcopy(rev))


def test_admission_rejects_cpu_and_memory_beside_an_instancetype(served: dict[str, Resource]) -> None:
    vm = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "v"},
          "spec": {"runStrategy": "Halted", "instancetype": {"name": "u1.small"},
                   "template": {"spec": {"domain": {"cpu": {"sockets": 2}, "memory": {"guest": "1Gi"},
                                                    "devices": {}}}}}}
    causes = admission.validate(served["VirtualMachine"], vm, None, "CREATE")
    msgs = [c for c in causes if "instance type" in c.message]
    assert len(msgs) == 1
    assert msgs[0].message == ("VM field(s) spec.template.spec.domain.cpu.sockets, "
                               "spec.template.spec.domain.memory.guest conflicts with selected instance type")
    assert msgs[0].field == "spec.template.spec.domain.cpu.sockets, spec.template.spec.domain.memory.guest"
    del vm["spec"]["template"]["spec"]["domain"]["cpu"]
    del vm["spec"]["template"]["spec"]["domain"]["memory"]
    assert not [c for c in admission.validate(served["VirtualMachine"], vm, None, "CREATE") if "instance" in c.message]


def test_common_objects_are_valid_expansions() -> None:
    its = {o["metadata"]["name"]: o["spec"] for o in common.instancetype_objects()}
    prefs = {o["metadata"]["name"]: o["spec"] for o in common.preference_objects()}
    assert {"u1.small", "u1.medium", "u1.large", "o1.small", "cx1.medium"} <= set(its)
    assert {"fedora", "ubuntu", "centos.stream9", "rhel.9", "windows.11"} <= set(prefs)
    vmi = instancetype.expand_vmi(_vmi(), {"instancetype": {"name": "u1.medium"}, "preference": {"name": "fedora"}},
                                  its["u1.medium"], prefs["fedora"])
    assert vmi["spec"]["domain"]["memory"]["guest"] == "4Gi"
    assert vmi["spec"]["domain"]["devices"]["disks"][0]["disk"] == {"bus": "virtio"}
    with pytest.raises(instancetype.ExpansionError, match="preference requires 2 vCPU"):
        instancetype.expand_vmi(_vmi(), {"instancetype": {"name": "u1.medium"}, "preference": {"name": "w"}},
                                its["u1.medium"], prefs["windows.11"])


def test_bare_volumes_get_a_disk_with_the_preferred_bus() -> None:
    vmi = _vmi({"domain": {"devices": {}}, "volumes": [{"name": "root", "containerDisk": {"image": "x"}}]})
    out = instancetype.expand_vmi(vmi, {"preference": {"name": "fedora"}}, None,
                                  {"devices": {"preferredDiskBus": "virtio"}})
    assert out["spec"]["domain"]["devices"]["disks"] == [{"name": "root", "disk": {"bus": "virtio"}}]
