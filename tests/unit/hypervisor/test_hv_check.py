"""Unsupported or invalid spec fields are reported with their field path, never silently ignored."""

from __future__ import annotations

from typing import Any

import pytest

from virtplane.hypervisor.devices import NON_HYPERVISOR_FIELDS, build_command, check_supported
from virtplane.hypervisor.errors import InvalidSpecError, UnsupportedSpecError


def fields(spec: dict[str, Any], prefix: str = "spec") -> dict[str, str]:
    return dict(check_supported(spec, prefix))


def test_testvm_is_supported(vmi) -> None:
    assert check_supported(vmi["spec"]) == []


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda s: s["domain"]["devices"]["disks"][0].update(lun={}), "spec.domain.devices.disks[0].lun"),
        (lambda s: s["domain"]["devices"].update(gpus=[{"name": "g", "deviceName": "x"}]), "spec.domain.devices.gpus"),
        (lambda s: s["domain"]["devices"].update(tpm={}), "spec.domain.devices.tpm"),
        (lambda s: s["domain"]["devices"].update(filesystems=[]), "spec.domain.devices.filesystems"),
        (lambda s: s["domain"]["devices"]["interfaces"][0].update(sriov={}), "spec.domain.devices.interfaces[0].sriov"),
        (lambda s: s["domain"]["devices"]["interfaces"][0].update(model="igb"),
         "spec.domain.devices.interfaces[0].model"),
        (lambda s: s["domain"].update(features={"hyperv": {"relaxed": {}}}), "spec.domain.features.hyperv"),
        (lambda s: s["domain"].update(cpu={"dedicatedCpuPlacement": True}), "spec.domain.cpu.dedicatedCpuPlacement"),
        (lambda s: s["domain"].update(memory={"hugepages": {"pageSize": "2Mi"}}), "spec.domain.memory.hugepages"),
        (lambda s: s["domain"].update(machine={"type": "pc-i440fx-7.2"}), "spec.domain.machine.type"),
        (lambda s: s["domain"].update(launchSecurity={"sev": {}}), "spec.domain.launchSecurity"),
        (lambda s: s["domain"]["devices"]["disks"][0].update(disk={"bus": "sata", "readonly": True}),
         "spec.domain.devices.disks[0].disk.readonly"),
        (lambda s: s["domain"]["devices"].update(autoattachVSOCK=True), "spec.domain.devices.autoattachVSOCK"),
        (lambda s: s["domain"]["devices"]["disks"][0].update(cdrom={"tray": "open"}, disk=None),
         "spec.domain.devices.disks[0].cdrom.tray"),
        (lambda s: s.update(architecture="arm64"), "spec.architecture"),
        (lambda s: s["volumes"].append({"name": "dump", "memoryDump": {}}), "spec.volumes[2].memoryDump"),
        (lambda s: s["domain"].update(someFutureField=1), "spec.domain.someFutureField"),
    ],
)
def test_unsupported_fields_have_paths(vmi, runtime, volumes, nets, mutate, path: str) -> None:
    spec = vmi["spec"]
    mutate(spec)
    for disk in spec["domain"]["devices"]["disks"]:
        if disk.get("disk", 0) is None:
            del disk["disk"]
    found = fields(spec)
    assert path in found, found
    with pytest.raises((UnsupportedSpecError, InvalidSpecError)) as err:
        build_command(vmi, runtime, volumes, nets, "tcg")
    assert err.value.field_path in found


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda s: s["domain"]["devices"]["disks"][0].update(name="nope"), "spec.domain.devices.disks[0].name"),
        (lambda s: s["domain"]["devices"]["disks"][0].update(cache="unsafe"), "spec.domain.devices.disks[0].cache"),
        (lambda s: s["domain"]["devices"]["disks"][0].update(io="native", cache="writeback"),
         "spec.domain.devices.disks[0].io"),
        (lambda s: s["domain"]["devices"]["disks"][0].update(cdrom={"bus": "virtio"}),
         "spec.domain.devices.disks[0].cdrom.bus"),
        (lambda s: s["domain"]["devices"]["interfaces"][0].update(macAddress="zz:zz"),
         "spec.domain.devices.interfaces[0].macAddress"),
        (lambda s: s["domain"]["resources"]["requests"].update(memory="lots"),
         "spec.domain.resources.requests.memory"),
        (lambda s: s["domain"]["firmware"].update(bootloader={"bios": {}, "efi": {}})
         if "firmware" in s["domain"] else s["domain"].update(firmware={"bootloader": {"bios": {}, "efi": {}}}),
         "spec.domain.firmware.bootloader"),
        (lambda s: s["domain"].update(firmware={"bootloader": {"efi": {}}}, features={"smm": {"enabled": False}}),
         "spec.domain.features.smm.enabled"),
        (lambda s: s["domain"]["devices"]["disks"][1].update(bootOrder=1)
         or s["domain"]["devices"]["interfaces"][0].update(bootOrder=1),
         "spec.domain.devices.interfaces[0].bootOrder"),
        (lambda s: s["domain"].update(clock={"timezone": "Mars/Olympus_Mons"}), "spec.domain.clock.timezone"),
    ],
)
def test_invalid_fields_have_paths(vmi, mutate, path: str) -> None:
    mutate(vmi["spec"])
    assert path in fields(vmi["spec"])


def test_multiple_problems_all_reported(vmi) -> None:
    vmi["spec"]["domain"]["devices"].update(tpm={}, sound={"name": "s"})
    vmi["spec"]["domain"]["devices"]["disks"][1]["lun"] = {}
    del vmi["spec"]["domain"]["devices"]["disks"][1]["disk"]
    assert set(fields(vmi["spec"])) >= {
        "spec.domain.devices.tpm", "spec.domain.devices.sound", "spec.domain.devices.disks[1].lun"}  # fmt: skip


def test_prefix_for_vm_templates(vmi) -> None:
    vmi["spec"]["domain"]["devices"]["tpm"] = {}
    assert "spec.template.spec.domain.devices.tpm" in fields(vmi["spec"], "spec.template.spec")


def test_missing_memory(vmi) -> None:
    del vmi["spec"]["domain"]["resources"]
    assert "spec.domain.memory.guest" in fields(vmi["spec"])


def test_other_layers_fields_are_accepted_and_listed(vmi) -> None:
    vmi["spec"].update(nodeSelector={"a": "b"}, evictionStrategy="LiveMigrate", terminationGracePeriodSeconds=0,
                       livenessProbe={"guestAgentPing": {}})  # fmt: skip
    vmi["spec"]["domain"]["devices"]["interfaces"][0]["ports"] = [{"port": 80}]
    assert check_supported(vmi["spec"]) == []
    assert NON_HYPERVISOR_FIELDS["spec.nodeSelector"] == "scheduler"
    assert NON_HYPERVISOR_FIELDS["spec.domain.devices.interfaces[].masquerade"] == "network layer"


def test_error_wraps_path(vmi, runtime, volumes, nets) -> None:
    vmi["spec"]["domain"]["devices"]["disks"][0]["lun"] = {}
    del vmi["spec"]["domain"]["devices"]["disks"][0]["disk"]
    with pytest.raises(UnsupportedSpecError) as err:
        build_command(vmi, runtime, volumes, nets, "tcg")
    assert err.value.field_path == "spec.domain.devices.disks[0].lun"
    assert "LUN" in err.value.message


def test_memoized_check_still_sees_a_malformed_firmware_uuid(vmi: dict[str, Any]) -> None:
    """check_supported is memoized with valid firmware UUIDs folded together; a bad one is still reported."""
    spec = vmi["spec"]
    for uid in ("6a1a24a1-4061-4607-8bf4-a3963d0c5895", "5d307ca9-b3ef-428c-8861-06e72d69f223"):
        spec["domain"]["firmware"] = {"uuid": uid}
        assert check_supported(spec) == []
    spec["domain"]["firmware"] = {"uuid": "not-a-uuid"}
    assert dict(check_supported(spec)) == {"spec.domain.firmware.uuid": "not a UUID: 'not-a-uuid'"}
