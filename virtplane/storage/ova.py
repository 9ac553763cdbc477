"""OVA / OVF: read a VMware or VirtualBox export and describe it as a KubeVirt VirtualMachine.

An OVA is a tar whose first member is the OVF descriptor (DMTF DSP0243, XML), optionally followed by a
manifest (`.mf`, the files' SHA-1/SHA-256 digests) and a certificate, then the files the descriptor's
`References` name (the disks: VMDKs, usually streamOptimized). `parse_ovf` reads what a VirtualMachine needs
from the descriptor's first VirtualSystem: CPUs (`ResourceType` 3, with VMware's `CoresPerSocket`), memory
(4), the disk drives (17) with their controllers (5 IDE, 6 SCSI, 20 SATA/NVMe) and capacities, the NICs (10)
with their networks, models and MACs, and the firmware (VMware's `firmware` config, VirtualBox's `Firmware`
element). `virtual_machine` turns that into a VirtualMachine whose disks are `dataVolumeTemplates` with an
`upload` source (the CLI then streams each disk file of the tar into its DataVolume).

Namespaces are matched by local name, so OVF 1.x and 2.x (`sasd`/`epasd` items) read the same.
"""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ET  # DOCTYPEs are refused before parsing
from collections.abc import Iterable, Mapping
from typing import Any

JSON = dict[str, Any]

# CIM ResourceType values (CIM_ResourceAllocationSettingData)
RT_CPU, RT_MEMORY, RT_IDE, RT_SCSI, RT_ETHERNET = 3, 4, 5, 6, 10
RT_CD, RT_DVD, RT_DISK, RT_OTHER_STORAGE = 15, 16, 17, 20
NIC_MODELS = {  # OVF ResourceSubType (lower case) -> KubeVirt interface model
    "e1000": "e1000", "e1000e": "e1000e", "pcnet32": "pcnet", "pcnetfast": "pcnet", "pcnet": "pcnet",
    "rtl8139": "rtl8139", "ne2k_pci": "ne2k_pci", "virtio": "virtio", "virtio-net": "virtio",
    "vmxnet3": "virtio", "vmxnet2": "virtio", "vmxnet": "virtio", "i82540em": "e1000", "i82543gc": "e1000",
    "i82545em": "e1000", "am79c970a": "pcnet", "am79c973": "pcnet",
}
DISK_BUSES = ("virtio", "sata", "scsi")
_MAC = re.compile(r"^[0-9A-Fa-f]{2}([:-]?[0-9A-Fa-f]{2}){5}$")
_DNS_LABEL = re.compile(r"[^a-z0-9-]+")


class OVFError(ValueError):
    """The descriptor cannot be imported; the message says why, for the user."""


@dataclasses.dataclass(slots=True)
class OVFFile:
    id: str
    href: str
    size: int | None
    compression: str  # "" or "gzip"


@dataclasses.dataclass(slots=True)
class OVFDisk:
    id: str
    file: OVFFile
    capacity: int  # bytes
    bus: str  # KubeVirt disk bus
    controller: str  # what the OVF says (e.g. "SCSI lsilogic"), for messages


@dataclasses.dataclass(slots=True)
class OVFNic:
    name: str  # ElementName, e.g. "Network adapter 1"
    network: str  # the OVF network (rasd:Connection)
    model: str  # KubeVirt model
    mac: str | None


@dataclasses.dataclass(slots=True)
class OVFMachine:
    name: str
    cpus: int
    cores_per_socket: int
    memory: int  # bytes
    firmware: str  # "bios" | "efi"
    secure_boot: bool
    disks: list[OVFDisk]
    nics: list[OVFNic]
    files: dict[str, OVFFile]  # href -> file, every file the descriptor references
    os_type: str = ""


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _attr(el: ET.Element, name: str, default: str = "") -> str:
    for k, v in el.attrib.items():
        if _local(k) == name:
            return v
    return default


def _children(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el if _local(c.tag) == name]


def _child(el: ET.Element, name: str) -> ET.Element | None:
    found = _children(el, name)
    return found[0] if found else None


def _text(el: ET.Element, name: str) -> str:
    c = _child(el, name)
    return (c.text or "").strip() if c is not None else ""


def parse_units(units: str, default: int = 1) -> int:
    """OVF allocation units ("byte * 2^20", "byte * 10^9", "MegaBytes", "KB", ...) as a byte multiplier."""
    u = units.strip()
    if not u:
        return default
    named = {"byte": 1, "bytes": 1, "kilobytes": 1 << 10, "kb": 1 << 10, "megabytes": 1 << 20, "mb": 1 << 20,
             "gigabytes": 1 << 30, "gb": 1 << 30, "terabytes": 1 << 40, "tb": 1 << 40}
    if u.lower() in named:
        return named[u.lower()]
    m = re.fullmatch(r"byte\s*(?:\*\s*(\d+)\s*\^\s*(-?\d+))?(?:\s*\*\s*(\d+))?", u, re.IGNORECASE)
    if not m:
        raise OVFError(f"unsupported allocation units {units!r}")
    base, exp, factor = m.groups()
    mult = int(base) ** int(exp) if base else 1
    return int(mult * (int(factor) if factor else 1))


def _int(value: str, what: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise OVFError(f"{what} is not a number: {value!r}") from None


def parse_ovf(data: bytes) -> OVFMachine:
    """The machine an OVF descriptor describes (its first VirtualSystem)."""
    upper = data.upper()
    if b"<!DOCTYPE" in upper or b"<!ENTITY" in upper:
        raise OVFError("the OVF descriptor declares a DOCTYPE or entities, which are not accepted")
    try:
        root = ET.fromstring(data)  # no DOCTYPE (checked above): no entities
    except ET.ParseError as err:
        raise OVFError(f"the OVF descriptor is not valid XML: {err}") from None
    if _local(root.tag) != "Envelope":
        raise OVFError(f"not an OVF descriptor (root element {_local(root.tag)!r}, expected Envelope)")

    files: dict[str, OVFFile] = {}
    by_id: dict[str, OVFFile] = {}
    refs = _child(root, "References")
    for f in _children(refs, "File") if refs is not None else []:
        href = _attr(f, "href")
        if not href or "/" in href or href in (".", ".."):
            raise OVFError(f"unsupported file reference {href!r}: an OVA holds its files side by side")
        if _attr(f, "chunkSize"):
            raise OVFError(f"file {href} is split into chunks (ovf:chunkSize), which is not supported")
        size = _attr(f, "size")
        file = OVFFile(_attr(f, "id"), href, int(size) if size.isdigit() else None, _attr(f, "compression"))
        if file.compression not in ("", "identity", "gzip"):
            raise OVFError(f"file {href}: unsupported compression {file.compression!r}")
        files[href] = by_id[file.id] = file

    disk_defs: dict[str, tuple[OVFFile, int]] = {}
    for section in _children(root, "DiskSection"):
        for d in _children(section, "Disk"):
            disk_id = _attr(d, "diskId")
            ref = _attr(d, "fileRef")
            if not ref:
                continue  # a blank disk: nothing to import (not supported yet, reported below if used)
            if ref not in by_id:
                raise OVFError(f"disk {disk_id} refers to file {ref!r}, which References does not list")
            cap = _attr(d, "capacity")
            if not cap.isdigit():
                raise OVFError(f"disk {disk_id}: capacity {cap!r} is not a number")
            disk_defs[disk_id] = (by_id[ref], int(cap) * parse_units(_attr(d, "capacityAllocationUnits")))

    systems = [el for el in root.iter() if _local(el.tag) == "VirtualSystem"]
    if not systems:
        raise OVFError("the OVF descriptor describes no VirtualSystem")
    if len(systems) > 1:
        raise OVFError(f"the OVF descriptor describes {len(systems)} virtual machines; import one VM per OVA")
    vs = systems[0]
    name = _text(vs, "Name") or _attr(vs, "id") or "imported"
    hw = _child(vs, "VirtualHardwareSection")
    if hw is None:
        raise OVFError(f"VirtualSystem {name} has no VirtualHardwareSection")
    config = _default_configuration(root)

    items: list[dict[str, str]] = []
    for it in hw:
        if _local(it.tag) not in ("Item", "StorageItem", "EthernetPortItem"):
            continue
        wanted = _attr(it, "configuration")
        if wanted and config and config not in wanted.split():
            continue
        fields = {_local(c.tag): (c.text or "").strip() for c in it}
        if not fields.get("ResourceType", "").isdigit():
            continue
        items.append(fields)

    cpus, cores, memory = 1, 1, 0
    controllers: dict[str, tuple[int, str]] = {}  # InstanceID -> (ResourceType, subtype)
    for f in items:
        rt = int(f["ResourceType"])
        if rt == RT_CPU:
            cpus = max(1, _int(f.get("VirtualQuantity", "1"), "the CPU count"))
            cores = max(1, _int(f.get("CoresPerSocket") or "1", "CoresPerSocket"))
        elif rt == RT_MEMORY:
            memory = _int(f.get("VirtualQuantity", "0"), "the memory size") * parse_units(
                f.get("AllocationUnits", ""), default=1 << 20)
        elif rt in (RT_IDE, RT_SCSI, RT_OTHER_STORAGE):
            controllers[f.get("InstanceID", "")] = (rt, f.get("ResourceSubType", ""))
    if memory < 1 << 20:
        raise OVFError(f"VirtualSystem {name}: no usable memory size in the VirtualHardwareSection")
    if cpus % cores:
        cores = 1

    disks: list[OVFDisk] = []
    nics: list[OVFNic] = []
    for f in items:
        rt = int(f["ResourceType"])
        if rt in (RT_DISK, RT_CD, RT_DVD):
            host = f.get("HostResource", "")
            if not host:
                continue  # an empty CD-ROM drive
            ref = host.rsplit("/", 1)[-1]
            if "/disk/" in host:
                if ref not in disk_defs:
                    raise OVFError(f"{f.get('ElementName') or 'a disk'} refers to disk {ref!r}, which has no file "
                                   "in the DiskSection (blank disks are not supported)")
                file, capacity = disk_defs[ref]
            elif "/file/" in host and ref in by_id:
                file = by_id[ref]
                capacity = file.size or 0
            else:
                raise OVFError(f"unsupported HostResource {host!r}")
            if rt != RT_DISK:
                raise OVFError(f"{f.get('ElementName') or 'a CD-ROM'} holds {file.href}: CD-ROM images in an OVA "
                               "are not supported yet")
            rtype, sub = controllers.get(f.get("Parent", ""), (0, ""))
            disks.append(OVFDisk(ref, file, capacity, _disk_bus(rtype, sub), _controller_name(rtype, sub)))
        elif rt == RT_ETHERNET:
            sub = f.get("ResourceSubType", "").lower()
            model = NIC_MODELS.get(sub, "virtio")
            mac = f.get("Address", "")
            nics.append(OVFNic(f.get("ElementName") or f"nic{len(nics)}", f.get("Connection", ""), model,
                               _mac(mac) if _MAC.match(mac) else None))
    if not disks:
        raise OVFError(f"VirtualSystem {name} has no disk to import")

    firmware, secure = "bios", False
    for el in hw.iter():
        local = _local(el.tag)
        if local == "Config" and _attr(el, "key") == "firmware":
            firmware = "efi" if _attr(el, "value").lower() == "efi" else "bios"
        elif local == "Config" and _attr(el, "key") == "uefi.secureBoot.enabled":
            secure = _attr(el, "value").lower() == "true"
    for el in vs.iter():  # VirtualBox: <vbox:Machine><Hardware><Firmware type="EFI"/>
        if _local(el.tag) == "Firmware" and _attr(el, "type").upper().startswith("EFI"):
            firmware = "efi"
    os_section = _child(vs, "OperatingSystemSection")
    os_type = (_attr(os_section, "osType") or _text(os_section, "Description")) if os_section is not None else ""
    return OVFMachine(name, cpus, cores, memory, firmware, secure and firmware == "efi", disks, nics, files,
                      os_type)


def _default_configuration(root: ET.Element) -> str:
    for section in root.iter():
        if _local(section.tag) != "DeploymentOptionSection":
            continue
        configs = _children(section, "Configuration")
        for c in configs:
            if _attr(c, "default").lower() == "true":
                return _attr(c, "id")
        if configs:
            return _attr(configs[0], "id")
    return ""


def _disk_bus(rtype: int, subtype: str) -> str:
    sub = subtype.lower()
    if rtype == RT_IDE:
        return "sata"  # KubeVirt has no IDE bus; the guest sees an AHCI controller
    if rtype == RT_SCSI:
        return "scsi"
    if rtype == RT_OTHER_STORAGE and ("ahci" in sub or "sata" in sub):
        return "sata"
    if rtype == RT_OTHER_STORAGE and "scsi" in sub:
        return "scsi"
    return "virtio"  # NVMe, virtio and unknown controllers


def _controller_name(rtype: int, subtype: str) -> str:
    kind = {RT_IDE: "IDE", RT_SCSI: "SCSI", RT_OTHER_STORAGE: "storage"}.get(rtype, "unknown")
    return f"{kind} {subtype}".strip()


def _mac(value: str) -> str:
    digits = re.sub(r"[:-]", "", value).lower()
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


def dns_name(value: str, limit: int = 63) -> str:
    """A DNS-1123 label from an OVF name ("My VM_1" -> "my-vm-1")."""
    out = _DNS_LABEL.sub("-", value.lower()).strip("-")[:limit].strip("-")
    return out or "imported"


def parse_manifest(data: bytes) -> dict[str, tuple[str, str]]:
    """The `.mf` digests: href -> (algorithm, hex), from lines like `SHA256(disk1.vmdk)= 12ab...`."""
    out: dict[str, tuple[str, str]] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        m = re.fullmatch(r"\s*(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9a-fA-F]+)\s*", line)
        if m:
            out[m.group(2)] = (m.group(1).lower(), m.group(3).lower())
    return out


@dataclasses.dataclass(slots=True)
class ImportOptions:
    name: str
    namespace: str
    storage_class: str = ""
    access_mode: str = ""
    volume_mode: str = ""  # "Block" | "Filesystem" | ""
    disk_bus: str = ""  # override every disk's bus
    network_map: Mapping[str, str] = dataclasses.field(default_factory=dict)  # OVF network -> "pod" | "ns/nad"
    run_strategy: str = "Halted"
    source: str = ""  # for the annotation


ANN_SOURCE = "virtplane.io/imported-from"
ANN_IMMEDIATE = "cdi.kubevirt.io/storage.bind.immediate.requested"


def datavolume_name(vm_name: str, disk: OVFDisk, index: int, taken: Iterable[str] = ()) -> str:
    base = dns_name(f"{vm_name}-{disk.id}" if disk.id else f"{vm_name}-disk{index}")
    name, n = base, 1
    while name in set(taken):
        n += 1
        name = f"{base[:60]}-{n}"
    return name


def _capacity_quantity(capacity: int) -> str:
    mib = max(1, -(-capacity // (1 << 20)))
    return f"{mib}Mi"


def virtual_machine(machine: OVFMachine, opts: ImportOptions) -> tuple[JSON, dict[str, str]]:
    """The VirtualMachine for `machine`, and href -> DataVolume name for each disk file to upload."""
    disks: list[JSON] = []
    volumes: list[JSON] = []
    templates: list[JSON] = []
    uploads: dict[str, str] = {}
    for i, disk in enumerate(machine.disks):
        if disk.file.href in uploads:
            raise OVFError(f"file {disk.file.href} backs two disks; each disk needs its own file")
        dv = datavolume_name(opts.name, disk, i, uploads.values())
        uploads[disk.file.href] = dv
        vol = f"disk{i}"
        entry: JSON = {"name": vol, "disk": {"bus": opts.disk_bus or disk.bus}}
        if i == 0:
            entry["bootOrder"] = 1
        disks.append(entry)
        volumes.append({"name": vol, "dataVolume": {"name": dv}})
        storage: JSON = {"resources": {"requests": {"storage": _capacity_quantity(disk.capacity)}}}
        if opts.storage_class:
            storage["storageClassName"] = opts.storage_class
        if opts.access_mode:
            storage["accessModes"] = [opts.access_mode]
        if opts.volume_mode:
            storage["volumeMode"] = opts.volume_mode
        templates.append({"metadata": {"name": dv, "annotations": {ANN_IMMEDIATE: "true"}},
                          "spec": {"source": {"upload": {}}, "contentType": "kubevirt", "storage": storage}})

    interfaces: list[JSON] = []
    networks: list[JSON] = []
    pod_used = False
    known = {n.network for n in machine.nics}
    unknown_maps = set(opts.network_map) - known
    if unknown_maps:
        raise OVFError(f"--network-map names {', '.join(sorted(unknown_maps))}, which the OVF does not use "
                       f"(its networks: {', '.join(sorted(known)) or 'none'})")
    for i, nic in enumerate(machine.nics):
        target = opts.network_map.get(nic.network, "" if pod_used else "pod")
        if not target:
            raise OVFError(f"{nic.name} is on network {nic.network!r}, which has no target: map it with "
                           f"--network-map '{nic.network}=NAMESPACE/NETWORK-ATTACHMENT-DEFINITION' (only one NIC can "
                           "use the pod network)")
        iname = f"nic{i}"
        iface: JSON = {"name": iname, "model": nic.model}
        if nic.mac:
            iface["macAddress"] = nic.mac
        if target == "pod":
            if pod_used:
                raise OVFError(f"{nic.name}: only one NIC can use the pod network; map {nic.network!r} to a "
                               "NetworkAttachmentDefinition with --network-map")
            pod_used = True
            iface["masquerade"] = {}
            networks.append({"name": iname, "pod": {}})
        else:
            iface["bridge"] = {}
            networks.append({"name": iname, "multus": {"networkName": target}})
        interfaces.append(iface)

    domain: JSON = {
        "cpu": {"sockets": machine.cpus // machine.cores_per_socket, "cores": machine.cores_per_socket,
                "threads": 1},
        "memory": {"guest": _capacity_quantity(machine.memory)},
        "devices": {"disks": disks, "interfaces": interfaces},
    }
    if not interfaces:
        domain["devices"]["autoattachPodInterface"] = False
    if machine.firmware == "efi":
        domain["firmware"] = {"bootloader": {"efi": {"secureBoot": machine.secure_boot}}}
    labels = {"kubevirt.io/vm": opts.name}
    meta: JSON = {"name": opts.name, "namespace": opts.namespace}
    if opts.source:
        meta["annotations"] = {ANN_SOURCE: opts.source}
    vm: JSON = {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": meta,
        "spec": {"runStrategy": opts.run_strategy, "dataVolumeTemplates": templates,
                 "template": {"metadata": {"labels": labels},
                              "spec": {"domain": domain, "networks": networks, "volumes": volumes}}},
    }
    return vm, uploads
