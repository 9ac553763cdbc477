"""VirtualMachineClone (clone.kubevirt.io/v1beta1): a new VM from a VM's spec and disks, stopped or running.

KubeVirt takes a VirtualMachineSnapshot of the source and restores it into the target; virtplane has no
snapshots yet, so the "snapshot" of a stopped VM is its volumes themselves, cloned with CDI DataVolumes
(`source.pvc`: copy-on-write when source and target share storage, host-assisted otherwise). A running
source (KubeVirt's online snapshot) gets a point-in-time copy of its PVC disks first: the VMI's `backup`
subresource (proxied to its node agent: guest file systems frozen while one QMP transaction starts a
blockdev-backup job per disk, thawed right after; the copies land beside the source volumes), reported in
the VMI's `status.changedBlockTracking.backupStatus`; the clone's `status.snapshotName` names it and the
target's DataVolumes take those copies (annotation virtplane.io/clone-source-backup) instead of the live
volumes. The source keeps running. The phases are KubeVirt's: SnapshotInProgress (the source is checked:
it must exist; a running one is copied) → CreatingTargetVM → RestoreInProgress (the DataVolume clones run)
→ Succeeded, or Failed with the reason in the Ready condition.

The target VM: the source's spec with
- every PVC/DataVolume volume pointing at its clone `restore-<clone uid prefix>-<volume>` (owned by the
  target VM, so deleting it deletes them) and no dataVolumeTemplates (the clones replace them);
- interfaces' `macAddress` removed (a new one is derived) or set from `newMacAddresses`;
- `firmware.uuid` removed (a new one is derived from the target name) and `firmware.serial` set from
  `newSMBiosSerial` or removed;
- labels/annotations (of the VM, and of its template with `template.labelFilters/annotationFilters`) kept
  when they match the filters: KubeVirt's wildcard patterns, `!` to exclude; default keep all.
Containerdisks, cloud-init and other ephemeral volumes are copied as they are.

- then `patches`: each string one JSON patch operation (RFC 6902) on the target VM, applied in order, as
  KubeVirt does; one that is not JSON or does not apply fails the clone naming it.

`volumeNamePolicy`: RandomizeNames (default) or PrefixTargetName (`<target>-<volume>`); a name already taken by
a DataVolume or PVC fails the clone (TargetVolumeExists) before anything is created.

Not implemented: `source.kind: VirtualMachineSnapshot` (virtplane has no VirtualMachineSnapshot yet).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
from typing import Any

from virtplane.api import patch
from virtplane.client import events, informer, rest
from virtplane.controllers import vmi as vmi_ctrl
from virtplane.controllers.datavolume import ANN_SOURCE_BACKUP

log = logging.getLogger(__name__)
JSON = dict[str, Any]

CLONES = rest.GVR("clone.kubevirt.io", "v1beta1", "virtualmachineclones")
VMS = rest.GVR("kubevirt.io", "v1", "virtualmachines")
VMIS = rest.GVR("kubevirt.io", "v1", "virtualmachineinstances")
PVCS = rest.GVR("", "v1", "persistentvolumeclaims")
DATAVOLUMES = rest.GVR("cdi.kubevirt.io", "v1beta1", "datavolumes")
COMPONENT = "virt-controller"
SUBRESOURCES = "/apis/subresources.kubevirt.io/v1"
CLONE_LABEL = "clone.kubevirt.io/clone-name"  # on the target's DataVolumes, to find them again
SNAPSHOT_IN_PROGRESS, CREATING_TARGET, RESTORE_IN_PROGRESS = "SnapshotInProgress", "CreatingTargetVM", \
    "RestoreInProgress"  # fmt: skip
SUCCEEDED, FAILED = "Succeeded", "Failed"


def matches(key: str, filters: list[str] | None) -> bool:
    """KubeVirt's label/annotation filters: the last matching pattern decides; `!pattern` excludes."""
    if filters is None:
        return True
    keep = False
    for pattern in filters:
        negate = pattern.startswith("!")
        if fnmatch.fnmatchcase(key, pattern[1:] if negate else pattern):
            keep = not negate
    return keep


def _filtered(values: dict[str, str] | None, filters: list[str] | None) -> dict[str, str]:
    return {k: v for k, v in (values or {}).items() if matches(k, filters)}


def claim_of(volume: JSON) -> str | None:
    if isinstance(volume.get("dataVolume"), dict):
        return volume["dataVolume"].get("name")
    if isinstance(volume.get("persistentVolumeClaim"), dict):
        return volume["persistentVolumeClaim"].get("claimName")
    return None


RANDOMIZE_NAMES, PREFIX_TARGET_NAME = "RandomizeNames", "PrefixTargetName"
VOLUME_NAME_POLICIES = (RANDOMIZE_NAMES, PREFIX_TARGET_NAME)


def restore_name(clone: JSON, volume: str) -> str:
    """The target's copy of the source volume `volume`, named by `spec.volumeNamePolicy`: RandomizeNames (the
    default) `restore-<clone uid prefix>-<volume>`, PrefixTargetName `<target VM>-<volume>`."""
    if (clone.get("spec") or {}).get("volumeNamePolicy") == PREFIX_TARGET_NAME:
        return f"{target_name(clone)}-{volume}"[:253]
    return f"restore-{clone['metadata']['uid'][:8]}-{volume}"[:253]


def backup_name(clone: JSON) -> str:
    """The running source's point-in-time copy for this clone (KubeVirt's status.snapshotName)."""
    return f"clone-{clone['metadata']['uid'][:8]}"


def target_name(clone: JSON) -> str:
    target = (clone.get("spec") or {}).get("target") or {}
    return target.get("name") or f"clone-{clone['metadata']['uid'][:8]}"


class PatchesError(ValueError):
    """`spec.patches` cannot be applied to the target: the message names the patch and why."""


def apply_patches(vm: JSON, patches: list[Any]) -> JSON:
    """KubeVirt's clone patches: each entry a JSON string of one JSON patch operation, applied in order."""
    ops = []
    for i, text in enumerate(patches):
        try:
            op = json.loads(text) if isinstance(text, str) else None
        except ValueError as exc:
            raise PatchesError(f"spec.patches[{i}] is not JSON: {exc}") from None
        if not isinstance(op, dict):
            raise PatchesError(f"spec.patches[{i}] must be one JSON patch operation (an object), got {text!r}")
        ops.append(op)
    try:
        return dict(patch.json_patch(vm, ops))
    except patch.PatchError as exc:
        raise PatchesError(f"spec.patches do not apply to the target VM: {exc}") from None


def target_vm(clone: JSON, source: JSON) -> JSON:
    """The target VM (pure): see the module docstring. PatchesError when `spec.patches` cannot be applied."""
    spec = clone.get("spec") or {}
    name = target_name(clone)
    smeta = source["metadata"]
    vm_spec = copy.deepcopy(source.get("spec") or {})
    vm_spec.pop("dataVolumeTemplates", None)
    template = vm_spec.setdefault("template", {})
    tmeta = template.setdefault("metadata", {})
    tfilters = spec.get("template") or {}
    tmeta["labels"] = _filtered(tmeta.get("labels"), tfilters.get("labelFilters"))
    if tmeta["labels"].get("kubevirt.io/vm") == smeta["name"]:
        tmeta["labels"]["kubevirt.io/vm"] = name
    tmeta["annotations"] = _filtered(tmeta.get("annotations"), tfilters.get("annotationFilters"))
    tspec = template.setdefault("spec", {})
    for volume in tspec.get("volumes") or []:
        claim = claim_of(volume)
        if claim:
            new = restore_name(clone, volume["name"])
            hot = {"hotpluggable": True} if (volume.get("dataVolume") or volume.get("persistentVolumeClaim")
                                             or {}).get("hotpluggable") else {}
            volume.pop("persistentVolumeClaim", None)
            volume["dataVolume"] = {"name": new, **hot}
    new_macs = spec.get("newMacAddresses") or {}
    for iface in ((tspec.get("domain") or {}).get("devices") or {}).get("interfaces") or []:
        if iface.get("name") in new_macs:
            iface["macAddress"] = new_macs[iface["name"]]
        else:
            iface.pop("macAddress", None)
    firmware = (tspec.get("domain") or {}).get("firmware")
    if isinstance(firmware, dict):
        firmware.pop("uuid", None)
        firmware.pop("serial", None)
    if spec.get("newSMBiosSerial"):
        tspec.setdefault("domain", {}).setdefault("firmware", {})["serial"] = spec["newSMBiosSerial"]
    vm = {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": smeta.get("namespace"),
                     "labels": _filtered(smeta.get("labels"), spec.get("labelFilters")),
                     "annotations": {k: v for k, v in _filtered(smeta.get("annotations"),
                                                                spec.get("annotationFilters")).items()
                                     if not k.startswith("kubevirt.io/latest-observed-api-version")
                                     and not k.startswith("kubevirt.io/storage-observed-api-version")}},
        "spec": vm_spec,
    }
    return apply_patches(vm, spec["patches"]) if spec.get("patches") else vm


class VMCloneController:
    def __init__(self, client: rest.Client) -> None:
        self.client = client
        self.clones = informer.Informer(client, CLONES)
        self.dvs = informer.Informer(client, DATAVOLUMES)
        self.vms = informer.Informer(client, VMS)
        self.recorder = events.EventRecorder(client, COMPONENT)
        self.queue = informer.WorkQueue(self._reconcile, workers=2, name="vmclone")
        self.clones.add_handler(lambda _k, obj, _o: self.queue.add(informer.key_of(obj)))
        self.dvs.add_handler(self._on_owned)
        self.vms.add_handler(self._on_vm)

    async def start(self) -> None:
        for inf in (self.clones, self.dvs, self.vms):
            inf.start()
        self.queue.start()

    async def stop(self) -> None:
        await self.queue.stop()
        for inf in (self.clones, self.dvs, self.vms):
            await inf.stop()

    def _on_owned(self, _kind: str, obj: JSON, _old: JSON | None) -> None:
        name = ((obj.get("metadata") or {}).get("labels") or {}).get(CLONE_LABEL)
        if name:
            self.queue.add((obj["metadata"].get("namespace") or "", name))

    def _on_vm(self, _kind: str, obj: JSON, _old: JSON | None) -> None:
        ns = obj["metadata"].get("namespace") or ""
        for clone in self.clones.list(ns):  # a source stopping lets its clones go on
            if ((clone.get("spec") or {}).get("source") or {}).get("name") == obj["metadata"]["name"]:
                self.queue.add((ns, clone["metadata"]["name"]))

    async def _reconcile(self, key: informer.Key) -> float | None:
        if not (self.clones.synced.is_set() and self.dvs.synced.is_set() and self.vms.synced.is_set()):
            return 0.2
        clone = self.clones.get(*key)
        if clone is None or clone["metadata"].get("deletionTimestamp"):
            return None
        status = clone.get("status") or {}
        if status.get("phase") in (SUCCEEDED, FAILED):
            return None
        ns = key[0]
        spec = clone.get("spec") or {}
        source_ref = spec.get("source") or {}
        if source_ref.get("kind") != "VirtualMachine":
            return await self._fail(clone, "UnsupportedSource",
                                    f"source kind {source_ref.get('kind')!r} is not supported: use VirtualMachine")
        target_ref = spec.get("target") or {}
        if target_ref.get("kind") not in (None, "VirtualMachine"):
            return await self._fail(clone, "UnsupportedTarget", "the target must be a VirtualMachine")
        policy = spec.get("volumeNamePolicy") or RANDOMIZE_NAMES
        if policy not in VOLUME_NAME_POLICIES:
            return await self._fail(clone, "InvalidVolumeNamePolicy", f"volumeNamePolicy {policy!r} is not "
                                    f"supported: use {' or '.join(VOLUME_NAME_POLICIES)}")
        name = target_name(clone)
        target = self.vms.get(ns, name)
        if status.get("phase") in (None, "", SNAPSHOT_IN_PROGRESS):
            source = self.vms.get(ns, str(source_ref.get("name") or ""))
            if source is None:
                await self._set(clone, SNAPSHOT_IN_PROGRESS, "False", "SourceDoesNotExist",
                                f"source VM {source_ref.get('name')} does not exist")
                return 5.0
            if target is not None:
                return await self._fail(clone, "TargetExists", f"target VM {name} already exists")
            try:
                target_vm(clone, source)  # patches that cannot apply fail the clone before anything is made
            except PatchesError as exc:
                return await self._fail(clone, "InvalidPatches", str(exc))
            taken = await self._taken_volume(clone, source)
            if taken:
                return await self._fail(clone, "TargetVolumeExists", f"{taken} already exists (volumeNamePolicy "
                                        f"{policy}): delete it or choose another target name or policy")
            try:
                vmi = await self.client.get(VMIS, source["metadata"]["name"], ns)
            except rest.NotFound:
                vmi = None
            phase = ((vmi or {}).get("status") or {}).get("phase")
            snapshot = ""
            if vmi is not None and phase not in ("Succeeded", "Failed"):
                if phase != "Running":
                    await self._set(clone, SNAPSHOT_IN_PROGRESS, "True", "SourceNotReady",
                                    f"the source VM is {phase or 'starting'}: waiting for it to run or stop")
                    return 2.0
                snapshot = backup_name(clone)
                done = await self._online_snapshot(clone, vmi, snapshot)
                if done is not None:
                    return done if done >= 0 else None
            await self._set(clone, CREATING_TARGET, "True", "CreatingTargetVM", f"creating VM {name}",
                            snapshot=snapshot)
            return await self._create_target(clone, source)
        if status.get("phase") == CREATING_TARGET:
            source = self.vms.get(ns, str(source_ref.get("name") or ""))
            if source is None:
                return await self._fail(clone, "SourceDoesNotExist", "the source VM was deleted during the clone")
            return await self._create_target(clone, source)
        # RestoreInProgress: the DataVolume clones
        dvs = [d for d in self.dvs.list(ns) if (d["metadata"].get("labels") or {}).get(CLONE_LABEL) == key[1]]
        failed = [d for d in dvs if (d.get("status") or {}).get("phase") == "Failed"]
        if failed:
            return await self._fail(clone, "RestoreFailed", f"cloning volume {failed[0]['metadata']['name']} failed")
        if all((d.get("status") or {}).get("phase") == "Succeeded" for d in dvs):
            await self._set(clone, SUCCEEDED, "False", "Succeeded", f"VM {name} was cloned", ready="True")
            await self.recorder.event(clone, "Normal", "CloneSucceeded", f"Successfully cloned into VM {name}")
            return None
        return None  # DataVolume events bring us back

    async def _online_snapshot(self, clone: JSON, vmi: JSON, snapshot: str) -> float | None:
        """A running source: its node agent's `backup` takes a point-in-time copy of the VM's PVC disks
        (guest file systems frozen while the copy jobs start, when its guest agent runs). None once it
        completed, else when to look again (or None after failing the clone)."""
        ns, name = vmi["metadata"].get("namespace") or "", vmi["metadata"]["name"]
        backup = (((vmi.get("status") or {}).get("changedBlockTracking") or {}).get("backupStatus") or {})
        if backup.get("backupName") == snapshot:
            if backup.get("completed"):
                return None
            if backup.get("failed"):
                await self._fail(clone, "SnapshotFailed", f"the point-in-time copy of the running source failed: "
                                 f"{backup.get('backupMsg') or 'unknown error'}")
                return -1.0
            return 1.0  # copying
        try:
            await self.client.request("PUT", f"{SUBRESOURCES}/namespaces/{ns}/virtualmachineinstances/{name}/backup",
                                      body={"backupName": snapshot, "cmd": "Start", "mode": "Push"})
        except rest.Conflict as exc:  # another backup of the VM runs, or the VMI just stopped
            await self._set(clone, SNAPSHOT_IN_PROGRESS, "True", "SnapshotInProgress",
                            f"waiting to snapshot the running source: {exc.status.get('message', exc)}")
            return 2.0
        except rest.APIError as exc:
            await self._fail(clone, "SnapshotFailed", f"cannot snapshot the running source: "
                             f"{exc.status.get('message', exc)}")
            return -1.0
        await self._set(clone, SNAPSHOT_IN_PROGRESS, "True", "SnapshotInProgress",
                        f"taking a point-in-time copy of the running VM {name}'s volumes", snapshot=snapshot)
        return 1.0

    async def _taken_volume(self, clone: JSON, source: JSON) -> str | None:
        """A DataVolume or PVC that already has the name one of the target's volumes would get."""
        ns = source["metadata"].get("namespace") or ""
        for volume in ((source.get("spec") or {}).get("template") or {}).get("spec", {}).get("volumes") or []:
            if not claim_of(volume):
                continue
            name = restore_name(clone, volume["name"])
            dv = self.dvs.get(ns, name)
            if dv is not None:
                if (dv["metadata"].get("labels") or {}).get(CLONE_LABEL) == clone["metadata"]["name"]:
                    continue  # ours, from an earlier pass
                return f"DataVolume {name}"
            try:
                await self.client.get(PVCS, name, ns)
                return f"PersistentVolumeClaim {name}"
            except rest.NotFound:
                pass
        return None

    async def _create_target(self, clone: JSON, source: JSON) -> float | None:
        ns = source["metadata"].get("namespace") or ""
        try:
            body = target_vm(clone, source)
        except PatchesError as exc:
            return await self._fail(clone, "InvalidPatches", str(exc))
        try:
            target = await self.client.create(VMS, body, ns)
        except rest.Conflict:
            target = await self.client.get(VMS, body["metadata"]["name"], ns)
        except rest.APIError as exc:
            return await self._fail(clone, "TargetVMCreationFailed", exc.status.get("message", str(exc)))
        owner = vmi_ctrl.owner_reference({**target, "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine"})
        for volume in ((source.get("spec") or {}).get("template") or {}).get("spec", {}).get("volumes") or []:
            claim = claim_of(volume)
            if not claim:
                continue
            try:
                pvc = await self.client.get(PVCS, claim, ns)
            except rest.NotFound:
                return await self._fail(clone, "SourceVolumeMissing", f"PVC {claim} of the source VM does not exist")
            pspec = pvc.get("spec") or {}
            storage: JSON = {"resources": copy.deepcopy(pspec.get("resources") or {})}
            for k in ("storageClassName", "volumeMode", "accessModes"):
                if pspec.get(k):
                    storage[k] = copy.deepcopy(pspec[k])
            dv = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                  "metadata": {"name": restore_name(clone, volume["name"]), "namespace": ns,
                               "labels": {CLONE_LABEL: clone["metadata"]["name"]}, "ownerReferences": [owner]},
                  "spec": {"source": {"pvc": {"namespace": ns, "name": claim}}, "storage": storage}}
            snapshot = (clone.get("status") or {}).get("snapshotName")
            if snapshot:  # an online clone: the copy comes from the running source's backup
                dv["metadata"]["annotations"] = {ANN_SOURCE_BACKUP: snapshot}
            try:
                await self.client.create(DATAVOLUMES, dv, ns)
            except rest.Conflict:  # created by an earlier pass, or someone else's (checked before the target VM)
                other = await self.client.get(DATAVOLUMES, dv["metadata"]["name"], ns)
                if (other["metadata"].get("labels") or {}).get(CLONE_LABEL) != clone["metadata"]["name"]:
                    return await self._fail(clone, "TargetVolumeExists",
                                            f"DataVolume {dv['metadata']['name']} already exists")
            except rest.APIError as exc:
                return await self._fail(clone, "RestoreFailed", exc.status.get("message", str(exc)))
        await self._set(clone, RESTORE_IN_PROGRESS, "True", "RestoreInProgress", "cloning the source's volumes",
                        target=target["metadata"]["name"])
        self.queue.add_after(informer.key_of(clone), 0.5)
        return None

    async def _fail(self, clone: JSON, reason: str, message: str) -> None:
        log.warning("clone %s/%s failed: %s", clone["metadata"].get("namespace"), clone["metadata"]["name"], message)
        await self._set(clone, FAILED, "False", reason, message, ready="False")
        await self.recorder.event(clone, "Warning", reason, message)

    async def _set(self, clone: JSON, phase: str, progressing: str, reason: str, message: str, *,
                   ready: str = "False", target: str | None = None, snapshot: str = "") -> None:  # fmt: skip
        for _attempt in range(5):
            body = copy.deepcopy(clone)
            status = body.setdefault("status", {})
            status["phase"] = phase
            if not status.get("creationTime"):
                status["creationTime"] = events.now_rfc3339()
            if target:
                status["targetName"] = target
            if snapshot:
                status["snapshotName"] = snapshot
            conds = list(status.get("conditions") or [])
            conds = vmi_ctrl.set_condition(conds, {"type": "Progressing", "status": progressing, "reason": reason,
                                                   "message": message, "lastProbeTime": None,
                                                   "lastTransitionTime": events.now_rfc3339()})
            conds = vmi_ctrl.set_condition(conds, {"type": "Ready", "status": ready, "reason": reason,
                                                   "message": message, "lastProbeTime": None,
                                                   "lastTransitionTime": events.now_rfc3339()})
            status["conditions"] = conds
            if body == clone:
                return
            try:
                await self.client.update_status(CLONES, body)
                return
            except rest.Conflict:
                clone = await self.client.get(CLONES, clone["metadata"]["name"], clone["metadata"].get("namespace"))
            except rest.NotFound:
                return
