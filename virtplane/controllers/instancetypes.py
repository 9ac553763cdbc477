"""The VM controller's half of instance types and preferences (KubeVirt's pkg/instancetype/controller/vm):
capture each referenced (Cluster)Instancetype / (Cluster)Preference in an apps/v1 ControllerRevision owned by
the VM the first time the VM is synced (`status.instancetypeRef.controllerRevisionRef`), then expand the
captured specs into every VMI the VM starts. Later edits of the instance type do not reach existing VMs;
the pure rules live in `virtplane.api.instancetype`."""

from __future__ import annotations

import copy
from typing import Any

from virtplane.api import instancetype
from virtplane.client import events, informer, rest
from virtplane.controllers import vmi as vmi_ctrl

JSON = dict[str, Any]
VMS = rest.GVR("kubevirt.io", "v1", "virtualmachines")
CONTROLLER_REVISIONS = rest.GVR("apps", "v1", "controllerrevisions")


class SyncError(Exception):
    """Shown as the VM's Failure condition (reason, message), as the VM controller's own SyncError."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Revisions:
    def __init__(self, client: rest.Client, recorder: events.EventRecorder, writes: vmi_ctrl.WriteTracker) -> None:
        self.client = client
        self.recorder = recorder
        self._writes = writes
        self._cache: dict[tuple[str | None, str], JSON] = {}  # ControllerRevisions are immutable

    async def store(self, vm: JSON) -> JSON:
        """KubeVirt's revision Store: capture each referenced instance type / preference in a ControllerRevision
        owned by the VM, once, and point `status.instancetypeRef` / `status.preferenceRef` at it."""
        spec, status = vm.get("spec") or {}, vm.get("status") or {}
        refs: JSON = {}
        for key, ref_key, pref in (("instancetype", "instancetypeRef", False),
                                   ("preference", "preferenceRef", True)):
            matcher = spec.get(key)
            try:
                kind = instancetype.kind_of(matcher, preference=pref)
            except instancetype.ExpansionError as exc:
                raise SyncError("FailedCreate", str(exc)) from exc
            if kind is None or ((status.get(ref_key) or {}).get("controllerRevisionRef") or {}).get("name"):
                continue
            gvr = rest.GVR(instancetype.GROUP, instancetype.VERSION, instancetype.PLURALS[kind])
            ns = None if instancetype.is_cluster_kind(kind) else vm["metadata"].get("namespace")
            try:
                obj = await self.client.get(gvr, matcher["name"], ns)
            except rest.NotFound as exc:
                reason = "FailedFindPreference" if pref else "FailedFindInstancetype"
                raise SyncError(reason, f"{instancetype.PLURALS[kind]}.{instancetype.GROUP} "
                                        f"\"{matcher['name']}\" not found") from exc
            obj.setdefault("kind", kind)
            if not pref:
                conflicts = [c for c in instancetype.apply_instancetype(
                    obj.get("spec") or {}, None, copy.deepcopy(((spec.get("template") or {}).get("spec")) or {}),
                    {}, "spec.template.spec") if not c.startswith("metadata.")]
                if conflicts:
                    raise SyncError("FailedCreate", instancetype.conflicts_message(conflicts))
            revision = instancetype.controller_revision(vm, obj, vmi_ctrl.owner_reference(
                {**vm, "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine"}))
            name = revision["metadata"]["name"]
            try:
                await self.client.create(CONTROLLER_REVISIONS, revision, vm["metadata"].get("namespace"))
            except rest.Conflict:
                existing = await self.client.get(CONTROLLER_REVISIONS, name, vm["metadata"].get("namespace"))
                if not instancetype.same_revision_data(existing, revision):
                    raise SyncError("FailedCreate", f"found existing ControllerRevision with unexpected data: "
                                                    f"{name}") from None
            refs[ref_key] = {"name": matcher["name"], "kind": kind, "controllerRevisionRef": {"name": name}}
        if not refs:
            return vm
        meta = vm["metadata"]
        try:
            patched = await self.client.patch(
                VMS, meta["name"], {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": refs},
                meta.get("namespace"), subresource="status")
        except rest.Conflict as exc:
            raise SyncError("FailedCreate", "the VM changed while its instance type revisions were stored") from exc
        self._writes.wrote(informer.key_of(vm), meta["resourceVersion"])
        return patched

    async def _spec(self, vm: JSON, ref_key: str) -> JSON | None:
        name = (((vm.get("status") or {}).get(ref_key) or {}).get("controllerRevisionRef") or {}).get("name")
        if not name:
            return None
        cached = self._cache.get((vm["metadata"].get("namespace"), name))
        if cached is None:
            try:
                rev = await self.client.get(CONTROLLER_REVISIONS, name, vm["metadata"].get("namespace"))
            except rest.NotFound as exc:
                raise SyncError("FailedCreate", f"ControllerRevision {name} of {ref_key} not found") from exc
            cached = instancetype.spec_from_revision(rev)
            self._cache[(vm["metadata"].get("namespace"), name)] = cached
        return copy.deepcopy(cached)

    async def expand(self, vm: JSON, vmi: JSON) -> None:
        """Apply the captured instance type and preference to the VMI about to be created."""
        spec = vm.get("spec") or {}
        if not spec.get("instancetype") and not spec.get("preference"):
            return
        it = await self._spec(vm, "instancetypeRef") if spec.get("instancetype") else None
        pref = await self._spec(vm, "preferenceRef") if spec.get("preference") else None
        if (spec.get("instancetype") and it is None) or (spec.get("preference") and pref is None):
            raise SyncError("FailedCreate", "instance type or preference revision not stored yet")
        try:
            instancetype.expand_vmi(vmi, spec, it, pref)
        except instancetype.ExpansionError as exc:
            await self.recorder.event(vm, "Warning", "FailedCreate", str(exc))
            raise SyncError("FailedCreate", str(exc)) from exc
