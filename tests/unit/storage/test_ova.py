"""OVF descriptors (VMware and VirtualBox flavours) to VirtualMachines, and `virtctl import-vm --dry-run`."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import yaml

from tests.unit.storage.ovas import make_ova, vmware_ovf
from virtplane.cli import virtctl
from virtplane.storage import ova

VBOX = b"""<?xml version="1.0"?>
<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:vbox="http://www.virtualbox.org/ovf/machine">
  <References>
    <File ovf:id="file1" ovf:href="Debian VM-disk001.vmdk"/>
    <File ovf:id="file2" ovf:href="Debian VM-disk002.vmdk"/>
  </References>
  <DiskSection>
    <Info>List of the virtual disks used in the package</Info>
    <Disk ovf:capacity="10737418240" ovf:diskId="vmdisk1" ovf:fileRef="file1"
      ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:capacity="1073741824" ovf:diskId="vmdisk2" ovf:fileRef="file2"
      ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection><Info>Logical networks used in the package</Info>
    <Network ovf:name="NAT"><Description>Logical network used by this appliance.</Description></Network>
    <Network ovf:name="HostOnly"><Description>Logical network used by this appliance.</Description></Network>
  </NetworkSection>
  <VirtualSystem ovf:id="Debian VM">
    <Info>A virtual machine</Info>
    <OperatingSystemSection ovf:id="96"><Info>The kind of installed guest operating system</Info>
      <Description>Debian_64</Description></OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements for a virtual machine</Info>
      <System><vssd:ElementName>Virtual Hardware Family</vssd:ElementName><vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>Debian VM</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>virtualbox-2.2</vssd:VirtualSystemType></System>
      <Item><rasd:Caption>4 virtual CPU</rasd:Caption><rasd:Description>Number of virtual CPUs</rasd:Description>
        <rasd:ElementName>4 virtual CPU</rasd:ElementName><rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>4</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits><rasd:Caption>2048 MB of memory</rasd:Caption>
        <rasd:ElementName>2048 MB of memory</rasd:ElementName><rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>2048</rasd:VirtualQuantity></Item>
      <Item><rasd:Address>0</rasd:Address><rasd:Caption>ideController0</rasd:Caption>
        <rasd:ElementName>ideController0</rasd:ElementName><rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>PIIX4</rasd:ResourceSubType><rasd:ResourceType>5</rasd:ResourceType></Item>
      <Item><rasd:Address>0</rasd:Address><rasd:Caption>sataController0</rasd:Caption>
        <rasd:ElementName>sataController0</rasd:ElementName><rasd:InstanceID>4</rasd:InstanceID>
        <rasd:ResourceSubType>AHCI</rasd:ResourceSubType><rasd:ResourceType>20</rasd:ResourceType></Item>
      <Item><rasd:AutomaticAllocation>true</rasd:AutomaticAllocation><rasd:Caption>Ethernet adapter on 'NAT'
        </rasd:Caption><rasd:Connection>NAT</rasd:Connection><rasd:ElementName>Ethernet adapter on 'NAT'
        </rasd:ElementName><rasd:InstanceID>5</rasd:InstanceID><rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType></Item>
      <Item><rasd:AutomaticAllocation>true</rasd:AutomaticAllocation><rasd:Connection>HostOnly</rasd:Connection>
        <rasd:ElementName>Ethernet adapter on 'HostOnly'</rasd:ElementName><rasd:InstanceID>6</rasd:InstanceID>
        <rasd:ResourceSubType>virtio</rasd:ResourceSubType><rasd:ResourceType>10</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:Caption>disk1</rasd:Caption>
        <rasd:ElementName>disk1</rasd:ElementName><rasd:HostResource>/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>7</rasd:InstanceID><rasd:Parent>4</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>1</rasd:AddressOnParent><rasd:Caption>disk2</rasd:Caption>
        <rasd:ElementName>disk2</rasd:ElementName><rasd:HostResource>/disk/vmdisk2</rasd:HostResource>
        <rasd:InstanceID>8</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>1</rasd:AddressOnParent><rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Caption>cdrom1</rasd:Caption><rasd:ElementName>cdrom1</rasd:ElementName>
        <rasd:InstanceID>9</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>15</rasd:ResourceType></Item>
    </VirtualHardwareSection>
    <vbox:Machine ovf:required="false" version="1.16-linux" uuid="{1b3e2c8e-0000-4000-8000-000000000001}"
      name="Debian VM"><ovf:Info>Complete VirtualBox machine configuration in VirtualBox format</ovf:Info>
      <Hardware><CPU count="4"/><Memory RAMSize="2048"/><Firmware type="EFI"/></Hardware></vbox:Machine>
  </VirtualSystem>
</Envelope>
"""


def test_vmware_descriptor() -> None:
    m = ova.parse_ovf(vmware_ovf("web-01", cpus=4, cores=2, memory_mib=1024, firmware="efi",
                                 nics=(("VM Network", "VmxNet3", "00:50:56:ab:cd:ef"),)))
    assert (m.name, m.cpus, m.cores_per_socket, m.memory, m.firmware) == ("web-01", 4, 2, 1 << 30, "efi")
    assert [(d.id, d.file.href, d.capacity, d.bus) for d in m.disks] == [
        ("vmdisk1", "tiny-disk1.vmdk", 128 << 20, "scsi")]
    assert [(n.network, n.model, n.mac) for n in m.nics] == [("VM Network", "virtio", "00:50:56:ab:cd:ef")]
    assert m.os_type == "otherLinux64Guest"


def test_virtualbox_descriptor() -> None:
    m = ova.parse_ovf(VBOX)
    assert (m.name, m.cpus, m.cores_per_socket, m.memory, m.firmware) == ("Debian VM", 4, 1, 2 << 30, "efi")
    # disks in the descriptor's order, each on its controller's bus; the empty CD-ROM drive is not a disk
    assert [(d.file.href, d.capacity, d.bus) for d in m.disks] == [
        ("Debian VM-disk001.vmdk", 10 << 30, "sata"), ("Debian VM-disk002.vmdk", 1 << 30, "sata")]
    assert [(n.network, n.model) for n in m.nics] == [("NAT", "e1000"), ("HostOnly", "virtio")]
    assert m.os_type == "Debian_64"


def test_virtual_machine_from_the_descriptor() -> None:
    m = ova.parse_ovf(VBOX)
    opts = ova.ImportOptions(name="debian", namespace="lab", storage_class="shared", volume_mode="Block",
                             network_map={"HostOnly": "lab/hostonly"}, source="/tmp/debian.ova")
    vm, uploads = ova.virtual_machine(m, opts)
    assert uploads == {"Debian VM-disk001.vmdk": "debian-vmdisk1", "Debian VM-disk002.vmdk": "debian-vmdisk2"}
    spec = vm["spec"]
    assert vm["metadata"] == {"name": "debian", "namespace": "lab",
                              "annotations": {"virtplane.io/imported-from": "/tmp/debian.ova"}}
    assert spec["runStrategy"] == "Halted"
    assert spec["dataVolumeTemplates"][0] == {
        "metadata": {"name": "debian-vmdisk1",
                     "annotations": {"cdi.kubevirt.io/storage.bind.immediate.requested": "true"}},
        "spec": {"source": {"upload": {}}, "contentType": "kubevirt",
                 "storage": {"resources": {"requests": {"storage": "10240Mi"}}, "storageClassName": "shared",
                             "volumeMode": "Block"}}}
    domain = spec["template"]["spec"]["domain"]
    assert domain["cpu"] == {"sockets": 4, "cores": 1, "threads": 1}
    assert domain["memory"] == {"guest": "2048Mi"}
    assert domain["firmware"] == {"bootloader": {"efi": {"secureBoot": False}}}
    assert domain["devices"]["disks"] == [{"name": "disk0", "disk": {"bus": "sata"}, "bootOrder": 1},
                                          {"name": "disk1", "disk": {"bus": "sata"}}]
    assert domain["devices"]["interfaces"] == [{"name": "nic0", "model": "e1000", "masquerade": {}},
                                               {"name": "nic1", "model": "virtio", "bridge": {}}]
    assert spec["template"]["spec"]["networks"] == [{"name": "nic0", "pod": {}},
                                                    {"name": "nic1", "multus": {"networkName": "lab/hostonly"}}]
    assert spec["template"]["spec"]["volumes"] == [{"name": "disk0", "dataVolume": {"name": "debian-vmdisk1"}},
                                                   {"name": "disk1", "dataVolume": {"name": "debian-vmdisk2"}}]


def test_second_network_needs_a_map() -> None:
    with pytest.raises(ova.OVFError, match="--network-map 'HostOnly=NAMESPACE/"):
        ova.virtual_machine(ova.parse_ovf(VBOX), ova.ImportOptions(name="x", namespace="d"))
    with pytest.raises(ova.OVFError, match="does not use"):
        ova.virtual_machine(ova.parse_ovf(VBOX), ova.ImportOptions(name="x", namespace="d",
                                                                   network_map={"Bridged": "pod"}))


@pytest.mark.parametrize(("ovf", "message"), [
    (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><Envelope/>', "DOCTYPE"),
    (b"<Envelope", "not valid XML"),
    (b"<Project/>", "not an OVF descriptor"),
    (vmware_ovf().replace(b"<VirtualSystem ", b"<VirtualSystemCollection><VirtualSystem ovf:id='a'/><VirtualSystem ")
     .replace(b"</VirtualSystem>", b"</VirtualSystem></VirtualSystemCollection>"), "2 virtual machines"),
    (vmware_ovf().replace(b'ovf:fileRef="file1"', b'ovf:fileRef="file9"'), "which References does not list"),
    (vmware_ovf().replace(b'ovf:href="tiny-disk1.vmdk"', b'ovf:href="../etc/passwd"'), "side by side"),
    (vmware_ovf().replace(b"<rasd:VirtualQuantity>256<", b"<rasd:VirtualQuantity>0<"), "no usable memory"),
])
def test_bad_descriptors(ovf: bytes, message: str) -> None:
    with pytest.raises(ova.OVFError, match=message):
        ova.parse_ovf(ovf)


@pytest.mark.parametrize(("units", "mult"), [("", 1), ("byte", 1), ("byte * 2^20", 1 << 20), ("byte * 2^30", 1 << 30),
                                            ("byte * 10^9", 10**9), ("MegaBytes", 1 << 20), ("GB", 1 << 30)])
def test_units(units: str, mult: int) -> None:
    assert ova.parse_units(units) == mult


def test_manifest() -> None:
    assert ova.parse_manifest(b"SHA256(a.ovf)= ABcd\nSHA1(disk 1.vmdk)=ef01\ngarbage\n") == {
        "a.ovf": ("sha256", "abcd"), "disk 1.vmdk": ("sha1", "ef01")}


def test_dry_run_prints_the_vm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk = tmp_path / "tiny-disk1.vmdk"
    disk.write_bytes(b"KDMV" + bytes(1020))
    path = make_ova(tmp_path / "tiny.ova", vmware_ovf(cpus=2, memory_mib=256), {disk.name: disk})
    assert virtctl.main(["import-vm", "--ova", str(path), "--dry-run", "--start", "-n", "lab"]) == 0
    vm = yaml.safe_load(capsys.readouterr().out)
    assert vm["metadata"]["name"] == "tiny" and vm["metadata"]["namespace"] == "lab"
    assert vm["spec"]["runStrategy"] == "Always"
    assert vm["spec"]["template"]["spec"]["domain"]["cpu"] == {"sockets": 2, "cores": 1, "threads": 1}


def test_first_member_must_be_the_descriptor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk = tmp_path / "d.vmdk"
    disk.write_bytes(b"x")
    path = tmp_path / "bad.ova"
    with tarfile.open(path, "w") as tar:
        tar.add(disk, arcname="d.vmdk")
    assert virtctl.main(["import-vm", "x", "--ova", str(path), "--dry-run"]) == 1
    assert "its first file must be the .ovf descriptor, found d.vmdk" in capsys.readouterr().err
    (tmp_path / "plain.ova").write_bytes(b"not a tar" * 100)
    assert virtctl.main(["import-vm", "--ova", str(tmp_path / "plain.ova"), "--dry-run"]) == 1
    assert "is not an OVA" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message", "code"), [
    ((), "--ova is required", 2),
    (("--ova", "/nonexistent.ova"), "no such file", 1),
    (("--ova", "http://x/a.ova", "--disk-bus", "ide"), "--disk-bus must be one of", 2),
    (("--ova", "http://x/a.ova", "--network-map", "nope"), "invalid --network-map", 2),
    (("Bad_Name", "--ova", "http://x/a.ova"), "not a valid name", 2),
])
def test_usage_errors(argv: tuple[str, ...], message: str, code: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert virtctl.main(["import-vm", *argv]) == code
    assert message in capsys.readouterr().err
