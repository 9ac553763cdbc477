"""AddVolumeOptions / RemoveVolumeOptions applied to specs (virtplane.api.hotplug), and the VM controller's
declarative-hotplug patch."""

from __future__ import annotations

import json

import pytest

from virtplane.api import hotplug
from virtplane.controllers import virtualmachine as vmc


def spec() -> dict:
    return {"domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]}},
            "volumes": [{"name": "root", "containerDisk": {"image": "x"}}]}


def test_parse_add_defaults_scsi_and_marks_hotpluggable() -> None:
    vol, disk = hotplug.parse_add({"name": "d", "disk": {"disk": {}},
                                   "volumeSource": {"dataVolume": {"name": "dv1"}}})
    assert vol == {"name": "d", "dataVolume": {"name": "dv1", "hotpluggable": True}}
    assert disk == {"name": "d", "disk": {"bus": "scsi"}}


@pytest.mark.parametrize(("body", "field"), [
    ({}, "name"),
    ({"name": "d"}, "disk"),
    ({"name": "d", "disk": {}}, "volumeSource"),
    ({"name": "d", "disk": {}, "volumeSource": {"containerDisk": {"image": "x"}}}, "volumeSource"),
    ({"name": "d", "disk": {"disk": {"bus": "sata"}}, "volumeSource": {"persistentVolumeClaim": {"claimName": "c"}}},
     "disk.disk.bus"),
    ({"name": "d", "disk": {}, "volumeSource": {"persistentVolumeClaim": {}}},
     "volumeSource.persistentVolumeClaim.claimName"),
])
def test_parse_add_rejects(body: dict, field: str) -> None:
    with pytest.raises(hotplug.HotplugRequestError) as exc:
        hotplug.parse_add(body)
    assert exc.value.field == field and not exc.value.conflict


def test_add_remove_and_conflicts() -> None:
    s = spec()
    vol, disk = hotplug.parse_add({"name": "d", "disk": {}, "volumeSource": {"dataVolume": {"name": "dv1"}}})
    hotplug.add_volume(s, vol, disk)
    assert hotplug.hotplug_volume_names(s) == ["d"]
    with pytest.raises(hotplug.HotplugRequestError, match="already exists") as exc:
        hotplug.add_volume(s, vol, disk)
    assert exc.value.conflict
    other, odisk = hotplug.parse_add({"name": "e", "disk": {}, "volumeSource": {"dataVolume": {"name": "dv1"}}})
    with pytest.raises(hotplug.HotplugRequestError, match="already exists as volume"):
        hotplug.add_volume(s, other, odisk)
    assert hotplug.without_hotplug(s) == spec()
    with pytest.raises(hotplug.HotplugRequestError, match="not hotpluggable"):
        hotplug.remove_volume(s, "root")
    with pytest.raises(hotplug.HotplugRequestError, match="does not exist"):
        hotplug.remove_volume(s, "nope")
    assert hotplug.remove_volume(s, "d") == spec()


def _vm(tspec: dict) -> dict:
    return {"metadata": {"name": "v", "namespace": "default", "uid": "u1", "generation": 1},
            "spec": {"template": {"spec": tspec}}}


def test_template_hash_ignores_hotplug_and_vmi_follows_template() -> None:
    plain = _vm(spec())
    hot = spec()
    hotplug.add_volume(hot, *hotplug.parse_add({"name": "d", "disk": {},
                                                "volumeSource": {"dataVolume": {"name": "dv1"}}}))
    assert vmc.template_spec_hash(plain) == vmc.template_spec_hash(_vm(hot))
    vmi = {"metadata": {"name": "v", "annotations": {}}, "spec": spec()}
    ops = vmc._hotplug_ops(hot, vmi)
    volumes = next(o for o in ops if o["path"] == "/spec/volumes")["value"]
    assert [v["name"] for v in volumes] == ["root", "d"]
    ann = next(o for o in ops if o["path"].startswith("/metadata/annotations/"))
    assert json.loads(ann["value"]) == ["d"]
    # a VMI-only hotplug (not in the annotation) stays when the template does not have it
    vmi = {"metadata": {"name": "v", "annotations": {vmc.HOTPLUG_ANNOTATION: "[]"}}, "spec": hot}
    assert vmc._hotplug_ops(spec(), vmi) == []
    # one that came from the template leaves with it
    vmi["metadata"]["annotations"][vmc.HOTPLUG_ANNOTATION] = '["d"]'
    ops = vmc._hotplug_ops(spec(), vmi)
    assert [v["name"] for v in next(o for o in ops if o["path"] == "/spec/volumes")["value"]] == ["root"]


def test_empty_cdrom_takes_a_medium_and_keeps_the_drive_on_eject() -> None:
    s = spec()
    s["domain"]["devices"]["disks"].append({"name": "cd", "cdrom": {"bus": "sata"}})
    assert hotplug.empty_cdrom_names(s) == {"cd"}
    vol = {"name": "cd", "dataVolume": {"name": "iso", "hotpluggable": True}}
    hotplug.add_volume(s, vol, {"name": "cd", "disk": {"bus": "scsi"}})
    assert s["domain"]["devices"]["disks"][-1] == {"name": "cd", "cdrom": {"bus": "sata"}}  # the drive's own
    assert hotplug.empty_cdrom_names(s) == set()
    # inserting or ejecting is not a restart-worthy change of the template
    assert "cd" in [d["name"] for d in hotplug.without_hotplug(s)["domain"]["devices"]["disks"]]
    hotplug.remove_volume(s, "cd")
    assert hotplug.empty_cdrom_names(s) == {"cd"}


def nic_spec() -> dict:
    s = spec()
    s["domain"]["devices"]["interfaces"] = [{"name": "default", "masquerade": {}}]
    s["networks"] = [{"name": "default", "pod": {}}]
    return s


def test_nic_add_remove_and_what_is_hotpluggable() -> None:
    s = nic_spec()
    hotplug.add_interface(s, {"name": "sec", "bridge": {}}, {"name": "sec", "multus": {"networkName": "nad1"}})
    assert hotplug.hotplug_interface_names(s) == ["sec"]  # the masquerade pod NIC is not
    with pytest.raises(hotplug.HotplugRequestError) as err:
        hotplug.add_interface(s, {"name": "sec", "bridge": {}}, {"name": "sec", "multus": {"networkName": "x"}})
    assert err.value.conflict
    with pytest.raises(hotplug.HotplugRequestError, match="only an interface with the bridge"):
        hotplug.remove_interface(s, "default")
    with pytest.raises(hotplug.HotplugRequestError, match="does not exist"):
        hotplug.remove_interface(s, "nope")
    hotplug.remove_interface(s, "sec")
    assert s["domain"]["devices"]["interfaces"][-1] == {"name": "sec", "bridge": {}, "state": "absent"}
    # a masquerade NIC on a multus network, or a multus default network, is not hotpluggable either
    t = nic_spec()
    t["domain"]["devices"]["interfaces"].append({"name": "m", "masquerade": {}})
    t["networks"].append({"name": "m", "multus": {"networkName": "n", "default": True}})
    assert hotplug.hotplug_interface_names(t) == []


def test_vm_template_nics_follow_live_and_restart_only_when_they_must() -> None:
    booted = nic_spec()
    hot = nic_spec()
    hotplug.add_interface(hot, {"name": "sec", "bridge": {}}, {"name": "sec", "multus": {"networkName": "nad1"}})
    # adding a hotpluggable NIC is not a restart-worthy change, and the VMI gets it with its network
    assert vmc.template_spec_hash(_vm(booted)) == vmc.template_spec_hash(_vm(hot))
    vmi = vmc.vmi_from_vm(_vm(booted))
    assert vmc.restart_required(_vm(hot), vmi) is False
    ops = vmc._interface_ops(hot, vmi)
    by_path = {o["path"]: o["value"] for o in ops}
    assert [i["name"] for i in by_path["/spec/domain/devices/interfaces"]] == ["default", "sec"]
    assert by_path["/spec/networks"][-1] == {"name": "sec", "multus": {"networkName": "nad1"}}
    vmi["spec"]["domain"]["devices"]["interfaces"] = by_path["/spec/domain/devices/interfaces"]
    vmi["spec"]["networks"] = by_path["/spec/networks"]
    assert vmc._interface_ops(hot, vmi) == []  # in sync
    # state: absent in the template is carried to the VMI (the node agent unplugs), and back again
    hotplug.remove_interface(hot, "sec")
    ops = vmc._interface_ops(hot, vmi)
    assert ops[0]["value"][-1] == {"name": "sec", "bridge": {}, "state": "absent"}
    assert vmc.restart_required(_vm(hot), vmi) is False
    # a plugged NIC dropped from the template without `absent`, or changed, needs a restart
    assert vmc.restart_required(_vm(booted), vmi) is True
    changed = nic_spec()
    hotplug.add_interface(changed, {"name": "sec", "bridge": {}, "model": "e1000e"},
                          {"name": "sec", "multus": {"networkName": "nad1"}})
    assert vmc.restart_required(_vm(changed), vmi) is True
    # the pod NIC itself is not hotpluggable: changing it is a restart
    masq = nic_spec()
    masq["domain"]["devices"]["interfaces"][0]["model"] = "e1000e"
    assert vmc.restart_required(_vm(masq), vmc.vmi_from_vm(_vm(booted))) is True
