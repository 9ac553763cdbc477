"""Command lines for KubeVirt-shaped specs (no QEMU started)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from virtplane.hypervisor.devices import (
    BuildOptions,
    block_node_names,
    build_command,
    plan_launch,
    spec_hash,
)
from virtplane.hypervisor.errors import MissingResourceError, UnsupportedSpecError
from virtplane.hypervisor.runtime import KernelBootFiles, NetworkAttachment, ResolvedVolume, RuntimeDir


def values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == option]


def value(argv: list[str], option: str) -> str:
    found = values(argv, option)
    assert len(found) == 1, f"{option}: {found}"
    return found[0]


def devices(argv: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for raw in values(argv, "-device"):
        dev = json.loads(raw)
        out[dev.get("id", dev["driver"])] = dev
    return out


def blockdevs(argv: list[str]) -> dict[str, dict[str, Any]]:
    return {d["node-name"]: d for d in map(json.loads, values(argv, "-blockdev"))}


def test_testvm_template(vmi, runtime, volumes, nets) -> None:
    argv = build_command(vmi, runtime, volumes, nets, "tcg")
    assert argv[0] == "qemu-system-x86_64"
    assert value(argv, "-machine").startswith("q35,")
    assert value(argv, "-accel") == "tcg,tb-size=32"  # a capped translation cache: bench/vm_memory.py
    assert value(argv, "-cpu") == "max"  # host-model has no meaning without KVM
    assert value(argv, "-m") == "size=62M"  # 64M = 61.04 MiB, rounded up
    assert value(argv, "-smp") == "1,sockets=1,cores=1,threads=1,maxcpus=1"
    assert "-S" in argv and "-nodefaults" in argv
    assert "shutdown=pause" in values(argv, "-action")
    assert value(argv, "-uuid") == vmi["metadata"]["uid"]
    assert f"uuid={vmi['metadata']['uid']}" in value(argv, "-smbios")

    devs = devices(argv)
    root = devs["disk-containerdisk"]
    assert root["driver"] == "virtio-blk-pci"
    assert root["drive"] == "d-containerdisk"
    assert root["bus"].startswith("rp")  # own root port: can be unplugged
    nodes = blockdevs(argv)
    assert nodes["f-containerdisk"]["driver"] == "file"
    assert nodes["f-containerdisk"]["filename"] == str(volumes["containerdisk"].path)
    assert nodes["d-containerdisk"] == {
        "driver": "qcow2", "file": "f-containerdisk", "node-name": "d-containerdisk",
        "cache": {"direct": False, "no-flush": False}, "read-only": False, "discard": "unmap",
    }  # fmt: skip
    assert nodes["d-cloudinitdisk"]["read-only"] is True
    assert nodes["d-cloudinitdisk"]["driver"] == "raw"

    nic = devs["net-default"]
    assert nic["driver"] == "virtio-net-pci"
    assert nic["netdev"] == "netdev-default"
    assert nic["mac"].startswith("52:54:00:")
    assert nic["romfile"] == ""  # no boot order → no PXE ROM
    netdev = json.loads(value(argv, "-netdev"))
    assert netdev == {"id": "netdev-default", "type": "tap", "ifname": "tap0", "script": "no", "downscript": "no"}

    # serial console: socket server + log file; QMP, QGA and VNC on unix sockets in the runtime dir
    chardevs = values(argv, "-chardev")
    serial = next(c for c in chardevs if c.startswith("socket,id=charserial0"))
    assert f"path={runtime.serial_sock}" in serial and f"logfile={runtime.console_log}" in serial
    assert "server=on" in serial and "wait=off" in serial
    assert devs["serial0"]["driver"] == "isa-serial"
    assert any(f"path={runtime.qmp_sock}" in c for c in chardevs)
    assert any(f"path={runtime.qga_sock}" in c for c in chardevs)
    assert devs["channel-qga"]["name"] == "org.qemu.guest_agent.0"
    assert value(argv, "-vnc") == f"unix:{runtime.vnc_sock},share=allow-exclusive"
    assert devs["video0"]["driver"] == "VGA"
    assert devs["balloon0"]["driver"] == "virtio-balloon-pci"
    assert devs["scsi0"]["driver"] == "virtio-scsi-pci"  # for SCSI hotplug
    assert "rng0" not in devs

    # spare hotplug ports after all the cold-plugged ones
    ports = [d for d in devs.values() if d["driver"] == "pcie-root-port"]
    assert [p["id"] for p in ports if p["id"].startswith("hp")] == ["hp0", "hp1", "hp2", "hp3"]
    assert len({(p["chassis"], p["port"]) for p in ports}) == len(ports)
    assert len({p["addr"] for p in ports}) == len(ports)
    # root ports come before the devices that use them
    first_user = min(i for i, a in enumerate(argv) if a.startswith('{"driver":"virtio-blk-pci"'))
    last_port = max(i for i, a in enumerate(argv) if a.startswith('{"driver":"pcie-root-port"'))
    assert last_port < first_user


def test_kvm_uses_host_cpu(vmi, runtime, volumes, nets) -> None:
    argv = build_command(vmi, runtime, volumes, nets, "kvm")
    assert value(argv, "-accel") == "kvm"
    assert value(argv, "-cpu") == "host"
    vmi["spec"]["domain"]["cpu"] = {"model": "host-passthrough"}
    assert value(build_command(vmi, runtime, volumes, nets, "kvm"), "-cpu") == "host"
    assert value(build_command(vmi, runtime, volumes, nets, "tcg"), "-cpu") == "max"
    vmi["spec"]["domain"]["cpu"] = {"model": "Skylake-Client-IBRS", "features": [
        {"name": "vmx", "policy": "disable"}, {"name": "pcid"}]}  # fmt: skip
    assert value(build_command(vmi, runtime, volumes, nets, "tcg"), "-cpu") == "Skylake-Client-IBRS,-vmx,+pcid"


def test_topology_and_memory_sources(vmi, runtime, volumes, nets) -> None:
    domain = vmi["spec"]["domain"]
    domain["cpu"] = {"sockets": 2, "cores": 2, "threads": 2, "maxSockets": 4}
    domain["memory"] = {"guest": "1Gi"}
    domain["resources"] = {"requests": {"memory": "512Mi"}, "limits": {"memory": "2Gi"}}
    argv = build_command(vmi, runtime, volumes, nets, "tcg")
    assert value(argv, "-smp") == "8,sockets=4,cores=2,threads=2,maxcpus=16"
    assert value(argv, "-m") == "size=1024M"  # memory.guest wins over requests

    del domain["cpu"], domain["memory"]
    domain["resources"] = {"requests": {"memory": "128Mi", "cpu": "500m"}, "limits": {"cpu": "3"}}
    argv = build_command(vmi, runtime, volumes, nets, "tcg")
    assert value(argv, "-m") == "size=128M"
    assert value(argv, "-smp") == "3,sockets=3,cores=1,threads=1,maxcpus=3"  # from limits.cpu, as sockets


def test_sata_disks_and_cdrom(vmi, runtime, volumes, nets, tmp_path: Path) -> None:
    disks = vmi["spec"]["domain"]["devices"]["disks"]
    disks[0]["disk"] = {"bus": "sata"}
    disks.append({"name": "installer", "cdrom": {}, "bootOrder": 1})
    disks.append({"name": "data", "disk": {"bus": "sata"}, "serial": "DATA-1", "cache": "writeback",
                  "bootOrder": 2})  # fmt: skip
    disks.append({"name": "scsicd", "cdrom": {"bus": "scsi"}})
    vmi["spec"]["volumes"] += [
        {"name": "installer", "containerDisk": {"image": "iso"}},
        {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
        {"name": "scsicd", "containerDisk": {"image": "iso2"}},
    ]
    volumes = dict(volumes)
    volumes["installer"] = ResolvedVolume(tmp_path / "installer.iso")
    volumes["data"] = ResolvedVolume(Path("/dev/vg0/data"), is_block_device=True, supports_direct_io=True)
    volumes["scsicd"] = ResolvedVolume(tmp_path / "other.iso")
    argv = build_command(vmi, runtime, volumes, nets, "tcg")
    devs = devices(argv)
    assert devs["disk-containerdisk"] == {
        "driver": "ide-hd", "id": "disk-containerdisk", "drive": "d-containerdisk", "write-cache": "off",
        "werror": "stop", "rerror": "stop", "bus": "ide.0",
    }  # fmt: skip
    assert devs["disk-installer"]["driver"] == "ide-cd"  # KubeVirt's default CD-ROM bus is sata
    assert devs["disk-installer"]["bus"] == "ide.1"
    assert devs["disk-installer"]["bootindex"] == 1
    assert "write-cache" not in devs["disk-installer"]
    assert devs["disk-data"]["bus"] == "ide.2"
    assert devs["disk-data"]["serial"] == "DATA-1"
    assert devs["disk-data"]["bootindex"] == 2
    assert devs["disk-data"]["write-cache"] == "on"
    assert devs["disk-scsicd"]["driver"] == "scsi-cd"
    assert devs["disk-scsicd"]["bus"] == "scsi0.0"
    nodes = blockdevs(argv)
    assert nodes["f-installer"]["read-only"] is True  # CD-ROMs default to read-only
    assert nodes["f-data"]["driver"] == "host_device"
    assert nodes["f-data"]["cache"] == {"direct": False, "no-flush": False}  # explicit writeback
    assert nodes["f-containerdisk"]["cache"]["direct"] is False  # no O_DIRECT support → writethrough


def test_scsi_virtio_cache_io_options(vmi, runtime, volumes, nets) -> None:
    disks = vmi["spec"]["domain"]["devices"]["disks"]
    disks[0].update({"disk": {"bus": "scsi"}, "cache": "none", "io": "native", "errorPolicy": "report",
                     "blockSize": {"custom": {"logical": 512, "physical": 4096}}})  # fmt: skip
    disks[1].update({"cache": "writethrough", "io": "threads", "dedicatedIOThread": True})
    argv = build_command(vmi, runtime, volumes, nets, "tcg")
    devs = devices(argv)
    assert devs["disk-containerdisk"]["driver"] == "scsi-hd"
    assert devs["disk-containerdisk"]["scsi-id"] == 0
    assert devs["disk-containerdisk"]["werror"] == "report"
    assert devs["disk-containerdisk"]["logical_block_size"] == 512
    assert devs["disk-containerdisk"]["physical_block_size"] == 4096
    assert devs["disk-containerdisk"]["write-cache"] == "on"
    nodes = blockdevs(argv)
    assert nodes["f-containerdisk"]["cache"]["direct"] is True
    assert nodes["f-containerdisk"]["aio"] == "native"
    assert nodes["f-cloudinitdisk"]["aio"] == "threads"
    assert devs["disk-cloudinitdisk"]["write-cache"] == "off"
    assert devs["disk-cloudinitdisk"]["iothread"] == "iothread-cloudinitdisk"
    assert '{"qom-type":"iothread","id":"iothread-cloudinitdisk"}' in values(argv, "-object")


def test_default_cache_none_with_direct_io(vmi, runtime, volumes, nets) -> None:
    volumes = dict(volumes)
    volumes["containerdisk"] = ResolvedVolume(volumes["containerdisk"].path, "qcow2", supports_direct_io=True)
    nodes = blockdevs(build_command(vmi, runtime, volumes, nets, "tcg"))
    assert nodes["f-containerdisk"]["cache"]["direct"] is True


def test_efi_and_secure_boot(vmi, runtime, volumes, nets) -> None:
    vmi["spec"]["domain"]["firmware"] = {"bootloader": {"efi": {"secureBoot": False}}}
    plan = plan_launch(vmi, runtime, volumes, nets, "tcg")
    argv = list(plan.argv)
    nodes = blockdevs(argv)
    assert nodes["fw-code-file"]["filename"] == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    assert nodes["fw-code"]["read-only"] is True
    assert nodes["fw-vars-file"]["filename"] == str(runtime.efi_vars)  # per-VM copy
    assert plan.seed_files == (("/usr/share/OVMF/OVMF_VARS_4M.fd", str(runtime.efi_vars)),)
    machine = value(argv, "-machine")
    assert "pflash0=fw-code" in machine and "pflash1=fw-vars" in machine and "smm=off" in machine
    assert devices(argv)["video0"]["driver"] == "bochs-display"  # KubeVirt's default for EFI

    vmi["spec"]["domain"]["firmware"] = {"bootloader": {"efi": {}}}  # secureBoot defaults to true
    plan = plan_launch(vmi, runtime, volumes, nets, "tcg")
    argv = list(plan.argv)
    assert blockdevs(argv)["fw-code-file"]["filename"] == "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
    assert plan.seed_files[0][0] == "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"  # Microsoft keys enrolled
    assert "smm=on" in value(argv, "-machine")
    assert "driver=cfi.pflash01,property=secure,value=on" in values(argv, "-global")


def test_smbios_identity(vmi, runtime, volumes, nets) -> None:
    vmi["spec"]["domain"]["firmware"] = {"serial": "SN,1", "uuid": "5d307ca9-b3ef-428c-8861-06e72d69f223"}
    vmi["spec"]["domain"]["chassis"] = {"manufacturer": "ACME", "asset": "A1"}
    argv = build_command(vmi, runtime, volumes, nets, "tcg")
    smbios = values(argv, "-smbios")
    assert "serial=SN,,1" in smbios[0]  # commas escaped for QEMU's option syntax
    assert "uuid=5d307ca9-b3ef-428c-8861-06e72d69f223" in smbios[0]
    assert smbios[1] == "type=3,manufacturer=ACME,asset=A1"
    assert value(argv, "-uuid") == "5d307ca9-b3ef-428c-8861-06e72d69f223"


def test_kernel_boot(vmi, runtime, volumes, nets, tmp_path: Path) -> None:
    vmi["spec"]["domain"]["firmware"] = {"kernelBoot": {
        "kernelArgs": "console=ttyS0 quiet",
        "container": {"image": "kernel-img", "kernelPath": "/boot/vmlinuz", "initrdPath": "/boot/initrd"}}}  # fmt: skip
    with pytest.raises(MissingResourceError):
        build_command(vmi, runtime, volumes, nets, "tcg")  # the node agent must extract the files
    files = KernelBootFiles(kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd")
    argv = build_command(vmi, runtime, volumes, nets, "tcg", kernel_boot=files)
    assert value(argv, "-kernel") == str(tmp_path / "vmlinuz")
    assert value(argv, "-initrd") == str(tmp_path / "initrd")
    assert value(argv, "-append") == "console=ttyS0 quiet"


def test_boot_order_on_nic_keeps_rom(vmi, runtime, volumes, nets) -> None:
    iface = vmi["spec"]["domain"]["devices"]["interfaces"][0]
    iface.update({"bootOrder": 1, "model": "e1000e", "macAddress": "DE-AD-00-00-BE-AF", "acpiIndex": 3})
    vmi["spec"]["domain"]["devices"]["disks"][0]["bootOrder"] = 2
    devs = devices(build_command(vmi, runtime, volumes, nets, "tcg"))
    nic = devs["net-default"]
    assert nic["driver"] == "e1000e"
    assert nic["bootindex"] == 1 and "romfile" not in nic
    assert nic["mac"] == "de:ad:00:00:be:af"
    assert nic["acpi-index"] == 3
    assert devs["disk-containerdisk"]["bootindex"] == 2


def test_network_attachments(vmi, runtime, volumes) -> None:
    argv = build_command(vmi, runtime, volumes, {"default": NetworkAttachment.user()}, "tcg")
    assert json.loads(value(argv, "-netdev")) == {"id": "netdev-default", "type": "user"}
    plan = plan_launch(vmi, runtime, volumes, {"default": NetworkAttachment.from_fd(17, vhost=True)}, "kvm")
    assert json.loads(value(list(plan.argv), "-netdev")) == {
        "id": "netdev-default", "type": "tap", "fd": "17", "vhost": True}  # fmt: skip
    assert plan.pass_fds == (17,)
    with pytest.raises(MissingResourceError):
        build_command(vmi, runtime, volumes, {}, "tcg")
    vmi["spec"]["domain"]["devices"]["interfaces"][0]["state"] = "absent"
    assert "-netdev" not in build_command(vmi, runtime, volumes, {}, "tcg")


def test_derived_mac_is_stable_and_distinct(vmi, runtime, volumes, nets) -> None:
    mac1 = devices(build_command(vmi, runtime, volumes, nets, "tcg"))["net-default"]["mac"]
    assert mac1 == devices(build_command(vmi, runtime, volumes, nets, "tcg"))["net-default"]["mac"]
    vmi["metadata"]["uid"] = "11111111-2222-3333-4444-555555555555"
    assert mac1 != devices(build_command(vmi, runtime, volumes, nets, "tcg"))["net-default"]["mac"]


def test_optional_devices(vmi, runtime, volumes, nets) -> None:
    d = vmi["spec"]["domain"]
    d["devices"].update({
        "rng": {}, "autoattachGraphicsDevice": False, "autoattachMemBalloon": False, "autoattachInputDevice": True,
        "watchdog": {"name": "wd", "i6300esb": {"action": "poweroff"}}, "logSerialConsole": False,
        "disableHotplug": True,
    })  # fmt: skip
    d["features"] = {"acpi": {}, "smm": {"enabled": True}}
    d["clock"] = {"utc": {}, "timer": {"hpet": {"present": False}, "rtc": {"tickPolicy": "catchup"}}}
    d["rebootPolicy"] = "Terminate"
    argv = build_command(vmi, runtime, volumes, nets, "tcg")
    devs = devices(argv)
    assert devs["rng0"]["driver"] == "virtio-rng-pci"
    assert "video0" not in devs and "-vnc" not in argv
    assert "balloon0" not in devs
    assert "scsi0" not in devs  # disableHotplug and no scsi disks
    assert devs["input-tablet"]["driver"] == "usb-tablet"
    assert devs["usb"]["driver"] == "qemu-xhci"
    assert devs["watchdog-wd"]["driver"] == "i6300esb"
    assert set(values(argv, "-action")) >= {"watchdog=poweroff", "reboot=shutdown"}
    assert "logfile" not in next(c for c in values(argv, "-chardev") if "charserial0" in c)
    assert "hpet=off" in value(argv, "-machine") and "smm=on" in value(argv, "-machine")
    assert value(argv, "-rtc") == "base=utc,driftfix=slew"


def test_hotplug_ports_option(vmi, runtime, volumes, nets) -> None:
    plan = plan_launch(vmi, runtime, volumes, nets, "tcg", options=BuildOptions(hotplug_ports=2))
    assert plan.hotplug_ports == ("hp0", "hp1")
    assert plan.has_scsi_controller


def test_missing_volume_is_reported(vmi, runtime, volumes, nets) -> None:
    del volumes["cloudinitdisk"]
    with pytest.raises(MissingResourceError, match="cloudinitdisk"):
        build_command(vmi, runtime, volumes, nets, "tcg")


def test_readonly_volume_on_sata_disk(vmi, runtime, volumes, nets) -> None:
    vmi["spec"]["domain"]["devices"]["disks"][1]["disk"] = {"bus": "sata"}
    with pytest.raises(UnsupportedSpecError) as err:
        build_command(vmi, runtime, volumes, nets, "tcg")
    assert err.value.field_path == "spec.domain.devices.disks[1].disk.bus"


def test_node_names_fit_qemu_limit() -> None:
    long = "a-very-long-volume-name-that-goes-on-and-on-for-a-while"
    names = block_node_names(long)
    assert len(names.file) <= 31 and len(names.format) <= 31
    assert names == block_node_names(long)  # deterministic: hotplug/unplug/adoption can recompute it
    assert names.file != block_node_names(long + "x").file
    assert block_node_names("root").format == "d-root"


def test_spec_hash_is_canonical(vmi) -> None:
    reordered = json.loads(json.dumps(vmi["spec"], sort_keys=True))
    other = dict(vmi, spec=reordered)
    assert spec_hash(vmi) == spec_hash(other)
    vmi["spec"]["domain"]["resources"]["requests"]["memory"] = "65M"
    assert spec_hash(vmi) != spec_hash(other)


def test_runtime_dir_limits(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="too long"):
        RuntimeDir(tmp_path / ("x" * 120))
    with pytest.raises(Exception, match="comma"):
        RuntimeDir(tmp_path / "a,b")


def test_empty_cdrom_drives(vmi, runtime, volumes, nets) -> None:
    # no volume: an empty drive (no medium, no block nodes) that Machine.change_medium fills later
    vmi["spec"]["domain"]["devices"]["disks"] += [{"name": "empty", "cdrom": {"bus": "sata"}},
                                                  {"name": "empty2", "cdrom": {"bus": "scsi"}}]
    argv = build_command(vmi, runtime, volumes, nets, "tcg")
    devs = devices(argv)
    assert devs["disk-empty"]["driver"] == "ide-cd" and "drive" not in devs["disk-empty"]
    assert devs["disk-empty2"]["driver"] == "scsi-cd" and "drive" not in devs["disk-empty2"]
    assert not any("empty" in name for name in blockdevs(argv))
