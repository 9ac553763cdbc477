"""Hotplug of volumes and NICs as spec edits: KubeVirt's AddVolumeOptions / RemoveVolumeOptions, and its
declarative NIC hotplug, applied to a VMI or VM spec.

Pure functions shared by the API server's `addvolume`/`removevolume` subresources, the VM controller (a
running VMI follows the hotpluggable volumes and interfaces of its VM's template: KubeVirt's declarative
hotplug), virtctl's `addinterface`/`removeinterface` and the node agent (which volumes QEMU must have
attached). A volume is hotpluggable when its `dataVolume` or `persistentVolumeClaim` source says
`hotpluggable: true`; an interface when it has the bridge binding on a multus (secondary) network, the kind
KubeVirt 1.x hotplugs (SR-IOV, the other kind, is not in virtplane).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

JSON = dict[str, Any]

SOURCES = ("dataVolume", "persistentVolumeClaim")
# KubeVirt hotplugs disks on scsi (its default) or virtio; CD-ROMs and LUNs only on scsi.
HOTPLUG_BUSES = {"disk": ("scsi", "virtio"), "lun": ("scsi",), "cdrom": ("scsi",)}


class HotplugRequestError(ValueError):
    """A request that can never succeed as given: `field` is the body field at fault (for a 422 cause)."""

    def __init__(self, field: str, message: str, *, conflict: bool = False) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.conflict = conflict  # the spec's current state is at fault (409), not the request (422)


def is_hotpluggable(volume: Mapping[str, Any]) -> bool:
    return any(isinstance(volume.get(s), Mapping) and bool(volume[s].get("hotpluggable")) for s in SOURCES)


def hotplug_volume_names(spec: Mapping[str, Any]) -> list[str]:
    """Names of the spec's hotpluggable volumes that have a disk (what QEMU attaches), in spec order."""
    disks = {d.get("name") for d in ((spec.get("domain") or {}).get("devices") or {}).get("disks") or []}
    return [str(v["name"]) for v in spec.get("volumes") or [] if is_hotpluggable(v) and v.get("name") in disks]


def _interfaces(spec: Mapping[str, Any]) -> list[JSON]:
    return list(((spec.get("domain") or {}).get("devices") or {}).get("interfaces") or [])


def is_hotpluggable_interface(spec: Mapping[str, Any], iface: Mapping[str, Any]) -> bool:
    """Bridge binding on a multus network that is not the pod's default network."""
    net = next((n for n in spec.get("networks") or [] if n.get("name") == iface.get("name")), None) or {}
    multus = net.get("multus")
    return "bridge" in iface and isinstance(multus, Mapping) and not multus.get("default")


def hotplug_interface_names(spec: Mapping[str, Any]) -> list[str]:
    """Names of the spec's hotpluggable interfaces (absent ones included), in spec order."""
    return [str(i.get("name")) for i in _interfaces(spec) if is_hotpluggable_interface(spec, i)]


def interface_and_network(spec: Mapping[str, Any], name: str) -> tuple[JSON, JSON] | None:
    iface = next((i for i in _interfaces(spec) if i.get("name") == name), None)
    net = next((n for n in spec.get("networks") or [] if n.get("name") == name), None)
    if iface is None or net is None:
        return None
    return dict(iface), dict(net)


def add_interface(spec: JSON, iface: JSON, network: JSON) -> JSON:
    """Append an interface and its network; HotplugRequestError(conflict) when the name is taken."""
    name = iface.get("name")
    if not name:
        raise HotplugRequestError("name", "an interface to add needs a name")
    if any(i.get("name") == name for i in _interfaces(spec)) \
            or any(n.get("name") == name for n in spec.get("networks") or []):
        raise HotplugRequestError("name", f"Unable to add interface [{name}] because an interface or network with "
                                          "that name already exists", conflict=True)  # fmt: skip
    spec.setdefault("domain", {}).setdefault("devices", {}).setdefault("interfaces", []).append(iface)
    spec.setdefault("networks", []).append(network)
    return spec


def remove_interface(spec: JSON, name: str) -> JSON:
    """Mark a hotpluggable interface `state: absent` (KubeVirt's hot-unplug request); HotplugRequestError when
    it is missing or cannot be unplugged."""
    iface = next((i for i in _interfaces(spec) if i.get("name") == name), None)
    if iface is None:
        raise HotplugRequestError("name", f"Unable to remove interface [{name}] because it does not exist",
                                  conflict=True)
    if not is_hotpluggable_interface(spec, iface):
        raise HotplugRequestError("name", f"Unable to remove interface [{name}]: only an interface with the bridge "
                                          "binding on a secondary (multus) network can be unplugged",
                                  conflict=True)  # fmt: skip
    iface["state"] = "absent"
    return spec


def without_hotplug(spec: Mapping[str, Any]) -> JSON:
    """The spec minus its hotpluggable volumes and their disks, and its hotpluggable interfaces and their
    networks: what a running VMI cannot follow live (the VM controller's RestartRequired hash ignores hotplug
    changes, they are applied live)."""
    out = copy.deepcopy(dict(spec))
    nics = set(hotplug_interface_names(out))
    if nics:
        out["domain"]["devices"]["interfaces"] = [i for i in _interfaces(out) if i.get("name") not in nics]
        out["networks"] = [n for n in out.get("networks") or [] if n.get("name") not in nics]
    names = {str(v.get("name")) for v in out.get("volumes") or [] if is_hotpluggable(v)}
    if not names:
        return out
    out["volumes"] = [v for v in out.get("volumes") or [] if v.get("name") not in names]
    devices = (out.get("domain") or {}).get("devices")
    if isinstance(devices, dict) and devices.get("disks"):
        # A CD-ROM drive stays when its medium is a hotplugged volume: inserting or ejecting is live.
        devices["disks"] = [d for d in devices["disks"] if d.get("name") not in names or "cdrom" in d]
    return out


def empty_cdrom_names(spec: Mapping[str, Any]) -> set[str]:
    volumes = {v.get("name") for v in spec.get("volumes") or []}
    disks = ((spec.get("domain") or {}).get("devices") or {}).get("disks") or []
    return {str(d["name"]) for d in disks if "cdrom" in d and d.get("name") not in volumes}


def parse_add(body: Mapping[str, Any]) -> tuple[JSON, JSON]:
    """(volume, disk) from an AddVolumeOptions body; the source is marked hotpluggable."""
    name = body.get("name")
    if not name or not isinstance(name, str):
        raise HotplugRequestError("name", "AddVolumeOptions requires name to be set")
    disk = body.get("disk")
    if not isinstance(disk, Mapping):
        raise HotplugRequestError("disk", "AddVolumeOptions requires disk to not be nil")
    source = body.get("volumeSource")
    if not isinstance(source, Mapping):
        raise HotplugRequestError("volumeSource", "AddVolumeOptions requires VolumeSource to not be nil")
    kinds = [k for k in source if source.get(k) is not None]
    if len(kinds) != 1 or kinds[0] not in SOURCES:
        raise HotplugRequestError("volumeSource", "AddVolumeOptions requires one volume source: dataVolume or "
                                                  f"persistentVolumeClaim (got {kinds or 'none'})")
    kind = kinds[0]
    src = dict(source[kind])
    ref = src.get("name") if kind == "dataVolume" else src.get("claimName")
    if not ref:
        field = "name" if kind == "dataVolume" else "claimName"
        raise HotplugRequestError(f"volumeSource.{kind}.{field}", "required")
    src["hotpluggable"] = True
    disk = copy.deepcopy(dict(disk))
    disk["name"] = name  # KubeVirt: the disk is named after the volume
    targets = [k for k in ("disk", "lun", "cdrom") if k in disk]
    if len(targets) > 1:
        raise HotplugRequestError("disk", "only one of disk, lun, cdrom may be set")
    target = targets[0] if targets else "disk"
    disk.setdefault(target, {})
    bus = (disk[target] or {}).get("bus") or "scsi"
    if bus not in HOTPLUG_BUSES[target]:
        raise HotplugRequestError(f"disk.{target}.bus", f"hotplugged {target}s must use the "
                                                        f"{' or '.join(HOTPLUG_BUSES[target])} bus, not {bus}")
    disk[target] = {**(disk[target] or {}), "bus": bus}
    if disk.get("bootOrder") is not None:
        raise HotplugRequestError("disk.bootOrder", "a hotplugged disk cannot be a boot device")
    return {"name": name, kind: src}, disk


def add_volume(spec: JSON, volume: JSON, disk: JSON) -> JSON:
    """Append the volume and its disk; HotplugRequestError(conflict) when the name is taken."""
    name = volume["name"]
    devices = spec.setdefault("domain", {}).setdefault("devices", {})
    # An empty CD-ROM drive of that name takes the volume as its medium (cdrom inject); the drive keeps its
    # own settings (bus, bootOrder).
    insert = name in empty_cdrom_names(spec)
    if any(v.get("name") == name for v in spec.get("volumes") or []) \
            or (not insert and any(d.get("name") == name for d in devices.get("disks") or [])):
        raise HotplugRequestError("name", f"Unable to add volume [{name}] because volume with that name already "
                                          "exists", conflict=True)  # fmt: skip
    kind = next(k for k in SOURCES if k in volume)
    ref = volume[kind].get("name") if kind == "dataVolume" else volume[kind].get("claimName")
    for v in spec.get("volumes") or []:
        other = v.get("dataVolume", {}).get("name") if "dataVolume" in v else \
            (v.get("persistentVolumeClaim") or {}).get("claimName")
        if other and other == ref:
            raise HotplugRequestError("volumeSource", f"Unable to add volume source [{ref}] because it already "
                                                      f"exists as volume [{v.get('name')}]", conflict=True)
    spec.setdefault("volumes", []).append(volume)
    if not insert:
        devices.setdefault("disks", []).append(disk)
    return spec


def remove_volume(spec: JSON, name: str) -> JSON:
    """Drop a hotpluggable volume and its disk (a CD-ROM drive stays, empty: cdrom eject); HotplugRequestError
    when missing or not hotpluggable."""
    if not name:
        raise HotplugRequestError("name", "RemoveVolumeOptions requires name to be set")
    volume = next((v for v in spec.get("volumes") or [] if v.get("name") == name), None)
    if volume is None:
        raise HotplugRequestError("name", f"Unable to remove volume [{name}] because it does not exist",
                                  conflict=True)
    if not is_hotpluggable(volume):
        raise HotplugRequestError("name", f"Unable to remove volume [{name}] because it is not hotpluggable",
                                  conflict=True)
    spec["volumes"] = [v for v in spec.get("volumes") or [] if v.get("name") != name]
    devices = (spec.get("domain") or {}).get("devices") or {}
    if devices.get("disks"):
        devices["disks"] = [d for d in devices["disks"] if d.get("name") != name or "cdrom" in d]
    return spec


def volume_and_disk(spec: Mapping[str, Any], name: str) -> tuple[JSON, JSON] | None:
    volume = next((v for v in spec.get("volumes") or [] if v.get("name") == name), None)
    disks = ((spec.get("domain") or {}).get("devices") or {}).get("disks") or []
    disk = next((d for d in disks if d.get("name") == name), None)
    if volume is None or disk is None:
        return None
    return dict(volume), dict(disk)
