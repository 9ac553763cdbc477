"""Disk hotplug on the node: QEMU's disks follow the VMI's hotpluggable volumes (virt-handler's hotplug part).

The VMI spec is the desired state (the `addvolume`/`removevolume` subresources and the VM controller edit
it); `RuntimeMeta.hotplug` (vmi.json, so it survives an agent restart) records what QEMU has. Each reconcile
pass detaches volumes that left the spec (QMP device_del, wait for the guest to release the device, then
blockdev-del) and attaches new ones (resolve the PVC like at start, then blockdev-add + device_add: scsi disks
on the VM's virtio-scsi controller, virtio disks on a spare PCIe root port). A volume whose claim is not bound
yet stays `Pending` with the reason, and is retried.

status.volumeStatus phases are KubeVirt's: Pending → Ready, Detaching while an unplug has not completed; a
hotplugged volume's entry carries `hotplugVolume` (KubeVirt names its attachment pod there; virtplane has
none, QEMU opens the claim directly) and the message KubeVirt uses once attached.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from virtplane.api import hotplug as api_hotplug
from virtplane.client.events import EventRecorder
from virtplane.hypervisor.errors import HypervisorError
from virtplane.hypervisor.machine import RunState

from .vmiruntime import RuntimeMeta, VMIRuntime
from .volumes import VolumeError, VolumeNotReady, VolumeResolver

log = logging.getLogger(__name__)

JSON = dict[str, Any]
READY, PENDING, DETACHING = "Ready", "Pending", "Detaching"
UNPLUG_TIMEOUT = 30.0  # the guest must release a virtio disk (PCIe hot-unplug); a loaded TCG guest is slow
RETRY_NOT_READY = 3.0


def record_boot(meta: RuntimeMeta, vmi: Mapping[str, Any]) -> None:
    """Hotpluggable volumes present when QEMU starts are attached at boot: record them so that removing them
    from the spec later unplugs them. CD-ROM drives are recorded with their medium: their volume changing
    later inserts or ejects media instead."""
    spec = vmi.get("spec") or {}
    meta.hotplug = {name: _ready(name) for name in api_hotplug.hotplug_volume_names(spec)}
    disks = ((spec.get("domain") or {}).get("devices") or {}).get("disks") or []
    meta.cdroms = {str(d["name"]): _medium(spec, d["name"]) for d in disks if "cdrom" in d}


def _medium(spec: Mapping[str, Any], name: str) -> str:
    volume = next((v for v in spec.get("volumes") or [] if v.get("name") == name), None)
    return json.dumps(volume, sort_keys=True) if volume is not None else ""


def _ready(name: str) -> JSON:
    return {"phase": READY, "reason": "VolumeReady", "message": f"Successfully attach hotplugged volume {name} to VM"}


async def reconcile(resolver: VolumeResolver, vmi: Mapping[str, Any], rt: VMIRuntime,
                    recorder: EventRecorder) -> float | None:  # fmt: skip
    """Attach/detach to match the spec; returns a retry delay while something is pending, else None."""
    machine = rt.machine
    if machine is None or machine.state not in (RunState.RUNNING, RunState.PAUSED):
        return None
    spec = vmi.get("spec") or {}
    drives = rt.meta.cdroms
    wanted = [n for n in api_hotplug.hotplug_volume_names(spec) if n not in drives]
    state = rt.meta.hotplug
    retry, changed = await _media(resolver, vmi, rt, recorder)
    for name in [n for n in state if n not in wanted and n not in drives]:
        state[name] = {"phase": DETACHING, "reason": "VolumeDetaching", "message": f"Detaching volume {name}"}
        try:
            await machine.unplug_disk(name, timeout=UNPLUG_TIMEOUT)
        except HypervisorError as err:
            log.warning("unplugging %s from %s/%s failed: %s", name, *rt.key, err)
            state[name]["message"] = f"Detaching volume {name}: {err}"
            retry = RETRY_NOT_READY
            changed = True
            continue
        del state[name]
        rt.meta.volume_extra.pop(name, None)
        changed = True
        await recorder.event(dict(vmi), "Normal", "VolumeDetached", f"Hotplugged volume {name} was detached")
    for name in wanted:
        if (state.get(name) or {}).get("phase") == READY:
            continue
        pair = api_hotplug.volume_and_disk(spec, name)
        assert pair is not None  # hotplug_volume_names only names volumes with a disk
        volume, disk = pair
        try:
            resolved, info = await resolver.resolve_volume(vmi, volume, rt.disks_dir, f"volume {name}")
            await machine.hotplug_disk(disk, resolved)
        except VolumeNotReady as err:
            entry = {"phase": PENDING, "reason": err.reason, "message": err.message}
            retry = RETRY_NOT_READY
        except (VolumeError, HypervisorError) as err:
            # Retried at the normal resync: the PVC or the VM may change (e.g. a spare port freed by an unplug).
            entry = {"phase": PENDING, "reason": "HotplugFailed", "message": f"cannot attach volume {name}: {err}"}
            log.warning("hotplug of %s into %s/%s failed: %s", name, *rt.key, err)
        else:
            entry = _ready(name)
            rt.meta.volume_extra[name] = info
            await recorder.event(dict(vmi), "Normal", "VolumeAttached",
                                 f"Successfully attach hotplugged volume {name} to VM")
        if state.get(name) != entry:
            state[name] = entry
            changed = True
    if changed:
        rt.save()
    return retry


async def _media(resolver: VolumeResolver, vmi: Mapping[str, Any], rt: VMIRuntime,
                 recorder: EventRecorder) -> tuple[float | None, bool]:  # fmt: skip
    """CD-ROM drives follow their volume: a new one is inserted as the medium, a removed one is ejected."""
    machine = rt.machine
    assert machine is not None
    spec = vmi.get("spec") or {}
    disks = {d.get("name"): d for d in ((spec.get("domain") or {}).get("devices") or {}).get("disks") or []}
    state = rt.meta.hotplug
    retry: float | None = None
    changed = False
    for name, current in list(rt.meta.cdroms.items()):
        desired = _medium(spec, name)
        disk = disks.get(name)
        if desired == current or disk is None or "cdrom" not in disk:
            continue
        volume = next((v for v in spec.get("volumes") or [] if v.get("name") == name), None)
        try:
            resolved = None
            if volume is not None:
                resolved, info = await resolver.resolve_volume(vmi, volume, rt.disks_dir, f"volume {name}")
            await machine.change_medium(disk, resolved)
        except VolumeNotReady as err:
            state[name] = {"phase": PENDING, "reason": err.reason, "message": err.message}
            retry, changed = RETRY_NOT_READY, True
            continue
        except (VolumeError, HypervisorError) as err:
            log.warning("changing the medium of %s in %s/%s failed: %s", name, *rt.key, err)
            state[name] = {"phase": PENDING, "reason": "HotplugFailed", "message": f"cannot insert {name}: {err}"}
            changed = True
            continue
        rt.meta.cdroms[name] = desired
        changed = True
        if resolved is not None:
            state[name] = _ready(name)
            rt.meta.volume_extra[name] = info
            await recorder.event(dict(vmi), "Normal", "MediaInserted", f"Inserted volume {name} into its CD-ROM drive")
        else:
            state.pop(name, None)
            rt.meta.volume_extra.pop(name, None)
            await recorder.event(dict(vmi), "Normal", "MediaEjected", f"Ejected the medium of CD-ROM drive {name}")
    return retry, changed


def apply_status(obj: JSON, rt: VMIRuntime) -> None:
    """Hotplug phases over the volumeStatus the node agent built (which calls every volume with a disk Ready)."""
    status = obj.setdefault("status", {})
    entries: list[JSON] = list(status.get("volumeStatus") or [])
    hot = set(api_hotplug.hotplug_volume_names(obj.get("spec") or {}))
    state = rt.meta.hotplug
    for entry in entries:
        name = entry.get("name")
        if name not in hot:
            continue
        entry["hotplugVolume"] = {}
        entry.update(state.get(name) or {"phase": PENDING, "reason": "VolumePending",
                                          "message": f"Attaching volume {name}"})  # fmt: skip
    for name, info in state.items():
        if name not in hot:
            entries.append({"name": name, "hotplugVolume": {}, **info})
    status["volumeStatus"] = entries
