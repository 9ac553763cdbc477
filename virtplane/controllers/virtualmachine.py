"""The VM controller: keeps a VirtualMachine's one VMI in the state its run strategy asks for, as KubeVirt's
virt-controller does (pkg/virt-controller/watch/vm).

- runStrategy Always / RerunOnFailure / Manual / Halted / Once, and legacy `spec.running` (true = Always,
  false = Halted); `status.stateChangeRequests` (Start, Stop with the VMI uid) from the start/stop/restart
  subresources, trimmed once acted upon.
- Start = create the VMI from `spec.template` (name = VM name, controller ownerReference, the template's
  labels and annotations plus `kubevirt.io/vm` and `kubevirt.io/vm-generation`); stop = delete it.
- DataVolumes from `spec.dataVolumeTemplates` are created (owned by the VM) and waited for before a start.
- Crash loops: a VMI that ends without ever running counts in `status.startFailure` and the next start
  waits KubeVirt's backoff (printableStatus CrashLoopBackOff).
- `status`: printableStatus (first matching rule in KubeVirt's order), ready, created, runStrategy,
  observed/desiredGeneration, conditions (Ready from the VMI, the VMI's other conditions, Failure from
  sync errors, RestartRequired when the template spec changed in a way a running VMI cannot follow).
- The VM carries KubeVirt's `kubevirt.io/virtualMachineControllerFinalize` finalizer, so deleting a VM stops
  its VMI first and the VM shows Terminating until the VMI is gone.

KubeVirt remembers the spec a VMI was started from in a ControllerRevision; virtplane keeps two hashes on
the VMI instead: the template's metadata, and its spec without the live-updatable fields (RestartRequired
compares the latter). `kubevirt.io/vm-generation` on the VMI (hence `status.observedGeneration`) follows the
VM's generation when both hashes still match and the live-updatable fields have reached the VMI; KubeVirt
compares with the boot-time snapshot there, so its observedGeneration never catches up after a live update
(kubevirt/kubevirt#18700).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import random
import time
import uuid
from typing import Any

from virtplane.api import hotplug
from virtplane.client import events, informer, rest
from virtplane.controllers import instancetypes
from virtplane.controllers import vmi as vmi_ctrl

log = logging.getLogger(__name__)
JSON = dict[str, Any]

VMS = rest.GVR("kubevirt.io", "v1", "virtualmachines")
VMIS = vmi_ctrl.VMIS
PVCS = vmi_ctrl.PVCS
DATAVOLUMES = vmi_ctrl.DATAVOLUMES

COMPONENT = "virt-controller"
VM_FINALIZER = "kubevirt.io/virtualMachineControllerFinalize"
VM_LABEL = "kubevirt.io/vm"
GENERATION_ANNOTATION = "kubevirt.io/vm-generation"
LATEST_API_ANNOTATION = "kubevirt.io/latest-observed-api-version"
STORAGE_API_ANNOTATION = "kubevirt.io/storage-observed-api-version"
API_VERSION = "v1"
METADATA_HASH_ANNOTATION = "virtplane.io/vm-template-metadata-hash"
SPEC_HASH_ANNOTATION = "virtplane.io/vm-template-spec-hash"
IMMEDIATE_DV_ANNOTATION = "kubevirt.io/immediate-data-volume-creation"
# The hotpluggable volumes a VMI got from its VM's template (JSON list): only these follow the template, so a
# volume hotplugged into the VMI alone (not persisted) is not unplugged for being absent from the template.
HOTPLUG_ANNOTATION = "virtplane.io/vm-hotplug-volumes"
# With KubeVirt's default LiveUpdate rollout these follow a running VMI without a restart.
LIVE_UPDATABLE = ("nodeSelector", "affinity", "tolerations")
RESTART_REQUIRED_MESSAGE = "a non-live-updatable field was changed in the template spec"
MAX_CRASHLOOP_BACKOFF = 300  # defaultMaxCrashLoopBackoffDelaySeconds
FINAL_PHASES = ("Succeeded", "Failed")
DV_READY_PHASES = ("Succeeded", "WaitForFirstConsumer", "PendingPopulation")
# How long a VMI we created (or deleted) may be missing from the informer before we stop assuming it.
EXPECTATION_TIMEOUT = 30.0


class SyncError(Exception):
    """A reconcile failure users should see: the VM's Failure condition (reason, message)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# --------------------------------------------------------------------------------------------------
# run strategy


def run_strategy(vm: JSON) -> str:
    spec = vm.get("spec") or {}
    if spec.get("runStrategy"):
        return str(spec["runStrategy"])
    return "Always" if spec.get("running") else "Halted"


def is_final(vmi: JSON | None) -> bool:
    return vmi is not None and (vmi.get("status") or {}).get("phase") in FINAL_PHASES


def is_deleted(obj: JSON | None) -> bool:
    return obj is not None and bool(obj["metadata"].get("deletionTimestamp"))


def _requests(vm: JSON) -> list[JSON]:
    return list((vm.get("status") or {}).get("stateChangeRequests") or [])


def has_start_request(vm: JSON) -> bool:
    reqs = _requests(vm)
    return bool(reqs) and reqs[0].get("action") == "Start"


def has_start_paused_request(vm: JSON) -> bool:
    reqs = _requests(vm)
    return has_start_request(vm) and (reqs[0].get("data") or {}).get("startPaused") == "true"


def has_stop_request_for(vm: JSON, vmi: JSON) -> bool:
    reqs = _requests(vm)
    return bool(reqs) and reqs[0].get("action") == "Stop" and reqs[0].get("uid") == vmi["metadata"].get("uid")


def backoff_left(vm: JSON, now: float) -> float:
    failure = (vm.get("status") or {}).get("startFailure") or {}
    retry = vmi_ctrl.parse_time(failure.get("retryAfterTimestamp"))
    return max(0.0, retry - now) if retry is not None else 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What syncRunStrategy decided (pure): the controller then carries it out."""

    start: bool = False
    stop: bool = False
    add_start_request: bool = False  # RerunOnFailure: a failed VMI is restarted through a Start request
    set_always: bool = False  # Halted with a Start request (start paused): flip the spec to Always/running
    requeue_after: float | None = None


def plan_run_strategy(vm: JSON, vmi: JSON | None, now: float) -> Plan:
    strategy = run_strategy(vm)
    if strategy == "Always":
        if vmi is not None:
            if (has_stop_request_for(vm, vmi) or is_final(vmi)) and not is_deleted(vmi):
                return Plan(stop=True)  # restart: stop now, start once the old VMI is gone
            return Plan()
        left = backoff_left(vm, now)
        return Plan(requeue_after=left) if left > 0 else Plan(start=True)
    if strategy == "RerunOnFailure":
        if vmi is not None:
            failed = (vmi.get("status") or {}).get("phase") == "Failed"
            if not is_deleted(vmi) and (has_stop_request_for(vm, vmi) or is_final(vmi)):
                return Plan(stop=True, add_start_request=failed)
            return Plan()
        # coming from another strategy (status.runStrategy differs) counts as a start request
        if not has_start_request(vm) and (vm.get("status") or {}).get("runStrategy") == strategy:
            return Plan()
        left = backoff_left(vm, now)
        return Plan(requeue_after=left) if left > 0 else Plan(start=True)
    if strategy == "Manual":
        if vmi is not None:
            return Plan(stop=has_stop_request_for(vm, vmi) and not is_deleted(vmi))
        return Plan(start=has_start_request(vm))
    if strategy == "Halted":
        if vmi is None:
            return Plan(set_always=has_start_request(vm))
        return Plan(stop=not is_deleted(vmi))
    if strategy == "Once":
        return Plan(start=vmi is None)
    raise SyncError("FailedCreate", f"unknown runstrategy: {strategy}")


def is_set_to_start(vm: JSON, vmi: JSON | None) -> bool:
    strategy = run_strategy(vm)
    if strategy == "Always":
        return True
    if strategy == "Manual":
        return not has_stop_request_for(vm, vmi) if vmi is not None else has_start_request(vm)
    if strategy == "RerunOnFailure":
        return (vmi.get("status") or {}).get("phase") != "Succeeded" if vmi is not None else True
    if strategy == "Once":
        return vmi is None
    return False


def trim_state_change_requests(vm: JSON, vmi: JSON | None) -> list[JSON]:
    """isTrimFirstChangeRequestNeeded: drop the first request once it has been acted upon."""
    reqs = _requests(vm)
    if not reqs:
        return reqs
    first = reqs[0]
    if first.get("action") == "Stop":
        if vmi is None or not first.get("uid") or first.get("uid") != vmi["metadata"].get("uid"):
            return reqs[1:]
    elif first.get("action") == "Start":
        if vmi is not None and not is_deleted(vmi) and not is_final(vmi):
            return reqs[1:]
    return reqs


# --------------------------------------------------------------------------------------------------
# crash loop backoff


def start_backoff_seconds(fail_count: int, max_delay: int = MAX_CRASHLOOP_BACKOFF,
                          rng: random.Random | None = None) -> int:
    """calculateStartBackoffTime: interval * failCount^2 plus up to half of it at random, capped."""
    fail_count = max(fail_count, 1)
    interval = max(max_delay // 30, 10)
    delay = interval * fail_count * fail_count
    delay += (rng or random).randrange(delay // 2 + 1)
    return min(delay, max_delay)


def next_start_failure(vm: JSON, vmi: JSON | None, now: float, rng: random.Random | None = None) -> JSON | None:
    """syncStartFailureStatus: the VM's new `status.startFailure`."""
    current = (vm.get("status") or {}).get("startFailure")
    if vmi is not None and vmi_ctrl.ever_running(vmi):
        return None  # it ran: the crash loop (if any) is over
    if run_strategy(vm) not in ("Always", "RerunOnFailure", "Once"):
        return None
    if vmi is None or not is_final(vmi):
        return current
    uid = vmi["metadata"].get("uid")
    if current and current.get("lastFailedVMIUID") == uid:
        return current  # already counted
    count = int((current or {}).get("consecutiveFailCount") or 0) + 1
    retry = now + start_backoff_seconds(count, rng=rng)
    return {"consecutiveFailCount": count, "lastFailedVMIUID": uid,
            "retryAfterTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(retry))}


# --------------------------------------------------------------------------------------------------
# printableStatus


@dataclasses.dataclass(frozen=True, slots=True)
class Volumes:
    """The DataVolumes and PVCs of the VM's namespace, by name (for the storage-related statuses)."""

    dvs: dict[str, JSON] = dataclasses.field(default_factory=dict)
    pvcs: dict[str, JSON] = dataclasses.field(default_factory=dict)


def _template_volumes(vm: JSON) -> list[JSON]:
    return list((((vm.get("spec") or {}).get("template") or {}).get("spec") or {}).get("volumes") or [])


def _dv_error(vm: JSON, vols: Volumes) -> bool:
    for v in _template_volumes(vm):
        dv = vols.dvs.get((v.get("dataVolume") or {}).get("name", "")) if isinstance(v.get("dataVolume"), dict) \
            else None
        if dv is None:
            continue
        if (dv.get("status") or {}).get("phase") == "Failed":
            return True
        running = vmi_ctrl.get_condition(dv, "Running")
        if running and running.get("status") == "False" and running.get("reason") in ("Error", "ImagePullFailed"):
            return True
    return False


def _dv_provisioning(vm: JSON, vols: Volumes) -> bool:
    for v in _template_volumes(vm):
        dv = vols.dvs.get((v.get("dataVolume") or {}).get("name", "")) if isinstance(v.get("dataVolume"), dict) \
            else None
        phase = (dv or {}).get("status", {}).get("phase")
        if dv is None or phase in ("Succeeded", "PendingPopulation"):
            continue
        bound = vmi_ctrl.get_condition(dv, "Bound")
        if (bound or {}).get("status") == "True" or phase != "WaitForFirstConsumer":
            return True  # WaitForFirstConsumer and unbound is not provisioning
    return False


def _unbound_pvc(vm: JSON, vols: Volumes) -> bool:
    for v in _template_volumes(vm):
        pvc = vols.pvcs.get(vmi_ctrl.claim_name(v) or "")
        if pvc is not None and (pvc.get("status") or {}).get("phase") == "Pending":
            return True
    return False


def _vmi_condition_is(vmi: JSON | None, ctype: str, status: str, reason: str | None = None) -> bool:
    cond = vmi_ctrl.get_condition(vmi, ctype)
    return cond is not None and cond.get("status") == status and (reason is None or cond.get("reason") == reason)


def is_migrating(vmi: JSON) -> bool:
    ms = (vmi.get("status") or {}).get("migrationState") or {}
    return bool(ms.get("startTimestamp")) and not ms.get("endTimestamp") and not ms.get("completed") \
        and not ms.get("failed")


def printable_status(vm: JSON, vmi: JSON | None, *, start_expected: bool = False, stop_expected: bool = False,
                     volumes: Volumes | None = None) -> str:
    """setPrintableStatus: the first status whose rule matches, in KubeVirt's order."""
    vols = volumes or Volumes()
    phase = ((vmi or {}).get("status") or {}).get("phase") or ""
    paused = _vmi_condition_is(vmi, "Paused", "True")
    rules: list[tuple[str, bool]] = [
        ("Terminating", is_deleted(vm)),
        ("Stopping", vmi is not None and not is_final(vmi) and (is_deleted(vmi) or stop_expected)),
        ("Migrating", vmi is not None and is_migrating(vmi)),
        ("Paused", vmi is not None and phase == "Running" and paused),
        ("Running", vmi is not None and phase == "Running" and not paused),
        ("ErrorPvcNotFound", _vmi_condition_is(vmi, "Synchronized", "False", "FailedPvcNotFound")),
        ("DataVolumeError", _dv_error(vm, vols)),
        ("ErrorUnschedulable", _vmi_condition_is(vmi, "PodScheduled", "False", "Unschedulable")),
        ("Provisioning", _dv_provisioning(vm, vols)),
        ("WaitingForVolumeBinding", is_set_to_start(vm, vmi) and _unbound_pvc(vm, vols)),
        ("ErrImagePull", _vmi_condition_is(vmi, "Synchronized", "False", "ErrImagePull")),
        ("ImagePullBackOff", _vmi_condition_is(vmi, "Synchronized", "False", "ImagePullBackOff")),
        ("Starting", start_expected if vmi is None else phase in ("", "Pending", "Scheduling", "Scheduled")),
        ("CrashLoopBackOff", (vmi is None or is_final(vmi)) and not start_expected
         and int(((vm.get("status") or {}).get("startFailure") or {}).get("consecutiveFailCount") or 0) > 0
         and run_strategy(vm) in ("Always", "RerunOnFailure", "Once")),
        ("Stopped", is_final(vmi) if vmi is not None else not start_expected),
    ]
    return next((name for name, matches in rules if matches), "Unknown")


# --------------------------------------------------------------------------------------------------
# conditions


def sync_conditions(conditions: list[JSON], vmi: JSON | None, error: SyncError | None) -> list[JSON]:
    """syncConditions: Ready mirrors the VMI's, the VMI's other conditions are copied, Failure reports
    a sync error; RestartRequired is left to its own logic."""
    now = vmi_ctrl.now_rfc3339()
    ready = vmi_ctrl.get_condition(vmi, "Ready")
    if vmi is None:
        cond = {"type": "Ready", "status": "False", "reason": "VMINotExists", "message": "VMI does not exist",
                "lastProbeTime": None, "lastTransitionTime": now}
    elif ready is None:
        cond = {"type": "Ready", "status": "False", "reason": "VMIConditionMissing",
                "message": "VMI is missing the Ready condition", "lastProbeTime": None, "lastTransitionTime": now}
    else:
        cond = {"type": "Ready", "status": ready.get("status"), "reason": ready.get("reason"),
                "message": ready.get("message"), "lastProbeTime": ready.get("lastProbeTime"),
                "lastTransitionTime": ready.get("lastTransitionTime")}
    conditions = vmi_ctrl.set_condition(conditions, {k: v for k, v in cond.items() if v is not None
                                                     or k in ("lastProbeTime", "lastTransitionTime")})
    if error is None:
        conditions = vmi_ctrl.remove_condition(conditions, "Failure")
    else:
        conditions = vmi_ctrl.set_condition(conditions, {
            "type": "Failure", "status": "True", "reason": error.reason, "message": error.message,
            "lastProbeTime": None, "lastTransitionTime": now})
    if vmi is None:
        return conditions
    own = ("Ready", "Failure", "RestartRequired")
    vmi_conds = [c for c in (vmi.get("status") or {}).get("conditions") or [] if c.get("type") not in own]
    for c in vmi_conds:
        conditions = vmi_ctrl.set_condition(conditions, copy.deepcopy(c))
    present = {c.get("type") for c in vmi_conds}
    return [c for c in conditions if c.get("type") in own or c.get("type") in present]


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def template_metadata_hash(vm: JSON) -> str:
    return _hash((((vm.get("spec") or {}).get("template") or {}).get("metadata")) or {})


def template_spec_hash(vm: JSON) -> str:
    """The template spec without what a running VMI can follow live."""
    spec = hotplug.without_hotplug((((vm.get("spec") or {}).get("template") or {}).get("spec")) or {})
    for k in LIVE_UPDATABLE:
        spec.pop(k, None)
    return _hash(spec)


def observes_template(vm: JSON, vmi: JSON) -> bool:
    """Whether the VMI reflects the VM's current template: started from the same metadata and spec, with the
    live-updatable fields carried over."""
    annotations = vmi["metadata"].get("annotations") or {}
    if annotations.get(METADATA_HASH_ANNOTATION) != template_metadata_hash(vm) \
            or annotations.get(SPEC_HASH_ANNOTATION) != template_spec_hash(vm):
        return False
    tspec = (((vm.get("spec") or {}).get("template") or {}).get("spec")) or {}
    return all(tspec.get(k) == (vmi.get("spec") or {}).get(k) for k in LIVE_UPDATABLE)


def restart_required(vm: JSON, vmi: JSON | None) -> bool | None:
    """True when the template spec changed in a way the VMI cannot follow; None when unknown."""
    if vmi is None:
        return None
    started_from = (vmi["metadata"].get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
    if started_from is None:
        return None
    if started_from != template_spec_hash(vm):
        return True
    return _nic_change_needs_restart((((vm.get("spec") or {}).get("template") or {}).get("spec")) or {},
                                     vmi.get("spec") or {})


def _without_state(iface: JSON) -> JSON:
    return {k: v for k, v in iface.items() if k != "state"}


def _nic_change_needs_restart(tspec: JSON, vspec: JSON) -> bool:
    """The hash leaves hotpluggable NICs out (they come and go live); what they cannot do live is change: a
    plugged NIC whose template entry is gone without `state: absent` first (KubeVirt asks for absent), or
    whose binding, model, MAC or network changed."""
    for name in hotplug.hotplug_interface_names(vspec):
        current = hotplug.interface_and_network(vspec, name)
        if current is None or current[0].get("state") == "absent":
            continue
        wanted = hotplug.interface_and_network(tspec, name)
        if wanted is None:
            return True
        if _without_state(wanted[0]) != _without_state(current[0]) or wanted[1] != current[1]:
            return True
    return False


# --------------------------------------------------------------------------------------------------
# the VMI a VM starts


def vmi_from_vm(vm: JSON) -> JSON:
    """SetupVMIFromVM (pure)."""
    meta = vm["metadata"]
    template = copy.deepcopy((vm.get("spec") or {}).get("template") or {})
    tmeta = template.get("metadata") or {}
    spec = template.get("spec") or {}
    if has_start_paused_request(vm):
        spec["startStrategy"] = "Paused"
    firmware = spec.setdefault("domain", {}).setdefault("firmware", {})
    if not firmware.get("uuid"):
        firmware["uuid"] = _legacy_firmware_uuid(meta["name"])
    annotations = {**(tmeta.get("annotations") or {}),
                   GENERATION_ANNOTATION: str(meta.get("generation", 1)),
                   METADATA_HASH_ANNOTATION: template_metadata_hash(vm),
                   SPEC_HASH_ANNOTATION: template_spec_hash(vm),
                   HOTPLUG_ANNOTATION: json.dumps(hotplug.hotplug_volume_names(spec)),
                   LATEST_API_ANNOTATION: API_VERSION, STORAGE_API_ANNOTATION: API_VERSION}
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {
            "name": meta["name"],
            "namespace": meta.get("namespace"),
            "labels": {**(tmeta.get("labels") or {}), VM_LABEL: meta["name"]},
            "annotations": annotations,
            "ownerReferences": [vmi_ctrl.owner_reference({**vm, "apiVersion": "kubevirt.io/v1",
                                                          "kind": "VirtualMachine"})],
        },
        "spec": spec,
    }


def _hotplug_ops(tspec: JSON, vmi: JSON) -> list[JSON]:
    """JSON patch ops that bring the VMI's hotplugged volumes in line with the template's: add the template's
    hotpluggable volumes the VMI lacks, remove those the VMI got from the template that the template dropped."""
    vspec = copy.deepcopy(vmi.get("spec") or {})
    annotations = vmi["metadata"].get("annotations") or {}
    try:
        synced = [str(n) for n in json.loads(annotations.get(HOTPLUG_ANNOTATION) or "[]")]
    except ValueError:
        synced = []
    wanted = hotplug.hotplug_volume_names(tspec)
    present = {v.get("name") for v in vspec.get("volumes") or []}
    changed = False
    for name in wanted:
        pair = hotplug.volume_and_disk(tspec, name)
        if name in present or pair is None:
            continue
        try:
            hotplug.add_volume(vspec, *copy.deepcopy(pair))
        except hotplug.HotplugRequestError:
            continue  # its claim is already used by another volume of the VMI: nothing to add
        changed = True
    for name in synced:
        if name not in wanted and name in present:
            try:
                hotplug.remove_volume(vspec, name)
                changed = True
            except hotplug.HotplugRequestError:
                pass
    new_synced = [n for n in wanted if n in {v.get("name") for v in vspec.get("volumes") or []}]
    ops: list[JSON] = []
    if changed:
        ops.append({"op": "add", "path": "/spec/volumes", "value": vspec.get("volumes") or []})
        ops.append({"op": "add", "path": "/spec/domain/devices/disks",
                    "value": ((vspec.get("domain") or {}).get("devices") or {}).get("disks") or []})
    if changed or new_synced != synced:
        if not annotations:
            ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
        ops.append({"op": "add", "path": "/metadata/annotations/" + HOTPLUG_ANNOTATION.replace("/", "~1"),
                    "value": json.dumps(new_synced)})
    return ops


def _interface_ops(tspec: JSON, vmi: JSON) -> list[JSON]:
    """JSON patch ops that bring the VMI's hotpluggable NICs in line with the template's (KubeVirt's declarative
    NIC hotplug): a new one is added with its network, `state: absent` is carried over (the node agent unplugs
    it), and clearing `absent` again plugs it back."""
    vspec = vmi.get("spec") or {}
    ifaces = copy.deepcopy(((vspec.get("domain") or {}).get("devices") or {}).get("interfaces") or [])
    nets = copy.deepcopy(vspec.get("networks") or [])
    changed = False
    for name in hotplug.hotplug_interface_names(tspec):
        pair = hotplug.interface_and_network(tspec, name)
        if pair is None:
            continue
        wanted, network = copy.deepcopy(pair[0]), copy.deepcopy(pair[1])
        absent = wanted.get("state") == "absent"
        current = next((i for i in ifaces if i.get("name") == name), None)
        if current is None:
            if absent or any(n.get("name") == name for n in nets):
                continue
            ifaces.append(wanted)
            nets.append(network)
            changed = True
        elif absent and current.get("state") != "absent":
            current["state"] = "absent"
            changed = True
        elif not absent and current.get("state") == "absent":
            current.pop("state")
            changed = True
    if not changed:
        return []
    return [{"op": "add", "path": "/spec/domain/devices/interfaces", "value": ifaces},
            {"op": "add", "path": "/spec/networks", "value": nets}]


def _legacy_firmware_uuid(name: str) -> str:
    # KubeVirt's CalculateLegacyUUID namespace; admission normally sets the UUID on the VM already.
    return str(uuid.uuid5(uuid.UUID("6a1a24a1-4061-4607-8bf4-a3963d0c5895"), name))


def datavolume_from_template(vm: JSON, template: JSON) -> JSON:
    meta = template.get("metadata") or {}
    return {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {
            "name": meta.get("name"),
            "namespace": vm["metadata"].get("namespace"),
            **({"labels": meta["labels"]} if meta.get("labels") else {}),
            **({"annotations": meta["annotations"]} if meta.get("annotations") else {}),
            "ownerReferences": [vmi_ctrl.owner_reference({**vm, "apiVersion": "kubevirt.io/v1",
                                                          "kind": "VirtualMachine"})],
        },
        "spec": copy.deepcopy(template.get("spec") or {}),
    }


# --------------------------------------------------------------------------------------------------
# the controller


class VMController:
    def __init__(self, client: rest.Client) -> None:
        # Our own connection pool: every informer holds a watch connection open, and a pool shared with
        # watch-heavy neighbours (the garbage collector watches every resource) can run dry and stall writes.
        self.client = rest.Client(client.config, user_agent="virt-controller-vm")
        self.vms = informer.Informer(self.client, VMS)
        self.vmis = informer.Informer(self.client, VMIS)
        self.dvs = informer.Informer(self.client, DATAVOLUMES)
        self.pvcs = informer.Informer(self.client, PVCS)
        self.queue = informer.WorkQueue(self._reconcile, workers=4, name="vm")
        self.recorder = events.EventRecorder(self.client, COMPONENT)
        # KubeVirt's expectations: a VMI we created / deleted that the informer has not reflected yet.
        self._created: dict[informer.Key, tuple[JSON, float]] = {}
        self._deleted: dict[informer.Key, tuple[str, float]] = {}
        self._writes = vmi_ctrl.WriteTracker()
        self.instancetypes = instancetypes.Revisions(self.client, self.recorder, self._writes)
        self.vms.add_handler(self._on_vm)
        self.vmis.add_handler(self._on_vmi)
        self.dvs.add_handler(self._on_volume)
        self.pvcs.add_handler(self._on_volume)

    async def start(self) -> None:
        for inf in (self.vms, self.vmis, self.dvs, self.pvcs):
            inf.start()
        self.queue.start()

    async def stop(self) -> None:
        await self.queue.stop()
        for inf in (self.vms, self.vmis, self.dvs, self.pvcs):
            await inf.stop()
        await self.client.close()

    # ------------------------------------------------------------- events

    def _on_vm(self, kind: str, vm: JSON, old: JSON | None) -> None:
        key = informer.key_of(vm)
        if kind == "DELETED":
            self._created.pop(key, None)
            self._deleted.pop(key, None)
            return
        self.queue.add(key)

    def _on_vmi(self, kind: str, vmi: JSON, old: JSON | None) -> None:
        # The VM of a VMI has its name (owner or would-be adopter alike).
        self.queue.add(informer.key_of(vmi))

    def _on_volume(self, kind: str, obj: JSON, old: JSON | None) -> None:
        ns, name = informer.key_of(obj)
        for ref in obj["metadata"].get("ownerReferences") or []:
            if ref.get("kind") == "VirtualMachine":
                self.queue.add((ns, ref["name"]))
        for vm in self.vms.list(ns):
            if any(vmi_ctrl.claim_name(v) == name for v in _template_volumes(vm)):
                self.queue.add(informer.key_of(vm))

    # ------------------------------------------------------------- views

    def _current_vmi(self, key: informer.Key) -> tuple[JSON | None, bool, bool]:
        """(the VMI as far as we know, start expected, stop expected)."""
        cached = self.vmis.get(*key)
        now = time.monotonic()
        start_expected = stop_expected = False
        created = self._created.get(key)
        if created is not None:
            made, when = created
            if cached is not None or now - when > EXPECTATION_TIMEOUT:
                self._created.pop(key, None)
            else:
                cached, start_expected = made, True
        deleted = self._deleted.get(key)
        if deleted is not None:
            uid, when = deleted
            if cached is None or cached["metadata"].get("uid") != uid or is_deleted(cached) \
                    or now - when > EXPECTATION_TIMEOUT:
                self._deleted.pop(key, None)
            else:
                stop_expected = True
        return cached, start_expected, stop_expected

    def _volumes(self, ns: str) -> Volumes:
        return Volumes({d["metadata"]["name"]: d for d in self.dvs.list(ns)},
                       {p["metadata"]["name"]: p for p in self.pvcs.list(ns)})

    # ------------------------------------------------------------- reconcile

    async def _reconcile(self, key: informer.Key) -> float | None:
        if not (self.vms.synced.is_set() and self.vmis.synced.is_set()):
            return 0.2
        vm = self.vms.get(*key)
        if self._writes.stale(key, vm):
            return 0.05  # decisions need our last write (e.g. a startFailure) in the cache first
        if vm is None:
            return None
        if await self._ensure_metadata(vm):
            return None  # our write brings the VM back through the watch
        vmi, start_expected, stop_expected = self._current_vmi(key)
        if vmi is not None:
            ref = vmi_ctrl.controller_ref(vmi)
            if ref is None and not is_deleted(vm) and not start_expected:
                await self._adopt(vm, vmi)
                return None
            if ref is not None and ref.get("uid") != vm["metadata"]["uid"]:
                # A VMI of the same name belongs to someone else (e.g. a previous VM still terminating).
                log.info("VMI %s/%s is owned by %s, not by this VM; waiting", key[0], key[1], ref.get("uid"))
                await self._update_status(vm, None, None, start_expected=False, stop_expected=False)
                return 2.0
        error: SyncError | None = None
        requeue: float | None = None
        try:
            if is_deleted(vm):
                if vmi is None or "orphan" in (vm["metadata"].get("finalizers") or []):
                    await self._remove_finalizer(vm)
                elif not is_deleted(vmi):
                    await self._stop(vm, vmi)
                    stop_expected = True
            else:
                vm = await self.instancetypes.store(vm)
                vmi = await self._bump_generation(vm, vmi)
                ready = await self._sync_datavolumes(vm)
                if ready or run_strategy(vm) == "Halted":
                    plan = plan_run_strategy(vm, vmi, time.time())
                    requeue = plan.requeue_after
                    if plan.stop and vmi is not None:
                        await self._stop(vm, vmi)
                        stop_expected = True
                        if plan.add_start_request:
                            vm = await self._add_start_request(vm)
                    if plan.start:
                        start_expected = await self._start(vm)
                    if plan.set_always:
                        await self._set_always(vm)
                if vmi is not None and not start_expected:
                    await self._live_update(vm, vmi)
        except (SyncError, instancetypes.SyncError) as exc:
            error = SyncError(exc.reason, exc.message)
            log.warning("VM %s/%s: %s", key[0], key[1], exc.message)
        more = await self._update_status(vm, vmi, error, start_expected=start_expected, stop_expected=stop_expected)
        if error is not None:
            return 5.0
        candidates = [t for t in (requeue, more) if t is not None]
        return min(candidates) if candidates else None

    async def _ensure_metadata(self, vm: JSON) -> bool:
        """KubeVirt's first step (api version annotations) and its finalizer; True when it wrote."""
        meta = vm["metadata"]
        annotations = meta.get("annotations") or {}
        patch: JSON = {}
        if annotations.get(LATEST_API_ANNOTATION) != API_VERSION or \
                annotations.get(STORAGE_API_ANNOTATION) != API_VERSION:
            patch["annotations"] = {LATEST_API_ANNOTATION: API_VERSION, STORAGE_API_ANNOTATION: API_VERSION}
        if not is_deleted(vm) and VM_FINALIZER not in (meta.get("finalizers") or []):
            patch["finalizers"] = [*(meta.get("finalizers") or []), VM_FINALIZER]
        if not patch:
            return False
        patch["resourceVersion"] = meta["resourceVersion"]
        try:
            await self.client.patch(VMS, meta["name"], {"metadata": patch}, meta.get("namespace"))
            self._writes.wrote(informer.key_of(vm), meta["resourceVersion"])
        except (rest.NotFound, rest.Conflict):
            pass  # gone, or changed: the watch brings it back either way
        return True

    async def _adopt(self, vm: JSON, vmi: JSON) -> None:
        meta = vmi["metadata"]
        refs = [*(meta.get("ownerReferences") or []),
                vmi_ctrl.owner_reference({**vm, "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine"})]
        patch = {"metadata": {"ownerReferences": refs, "resourceVersion": meta["resourceVersion"]}}
        try:
            await self.client.patch(VMIS, meta["name"], patch, meta.get("namespace"))
            log.info("VM %s/%s adopted its orphaned VMI", meta.get("namespace"), meta["name"])
        except (rest.NotFound, rest.Conflict):
            pass

    async def _remove_finalizer(self, vm: JSON) -> None:
        meta = vm["metadata"]
        if VM_FINALIZER not in (meta.get("finalizers") or []):
            return
        rest_f = [f for f in meta.get("finalizers") or [] if f != VM_FINALIZER]
        patch = {"metadata": {"finalizers": rest_f, "resourceVersion": meta["resourceVersion"]}}
        try:
            await self.client.patch(VMS, meta["name"], patch, meta.get("namespace"))
            self._writes.wrote(informer.key_of(vm), meta["resourceVersion"])
        except rest.NotFound:
            pass
        except rest.Conflict:
            self.queue.add_after(informer.key_of(vm), 0.1)

    async def _start(self, vm: JSON) -> bool:
        body = vmi_from_vm(vm)
        meta = vm["metadata"]
        await self.instancetypes.expand(vm, body)
        try:
            created = await self.client.create(VMIS, body, meta.get("namespace"))
        except rest.Conflict:
            return True  # it exists already: the informer has not shown it yet
        except rest.APIError as exc:
            await self.recorder.event(vm, "Warning", "FailedCreate", f"Error creating virtual machine instance: "
                                      f"{exc.status.get('message', exc)}")
            raise SyncError("FailedCreate", f"Failure while starting VMI: {exc.status.get('message', exc)}") from exc
        self._created[informer.key_of(vm)] = (created, time.monotonic())
        log.info("VM %s/%s started: created VMI %s", meta.get("namespace"), meta["name"], created["metadata"]["uid"])
        await self.recorder.event(vm, "Normal", "SuccessfulCreate", "Started the virtual machine by creating the "
                                  f"new virtual machine instance {created['metadata']['name']}")
        return True

    async def _stop(self, vm: JSON, vmi: JSON) -> None:
        meta = vmi["metadata"]
        try:
            await self.client.delete(VMIS, meta["name"], meta.get("namespace"), preconditions={"uid": meta["uid"]})
        except rest.NotFound:
            return
        except rest.APIError as exc:
            await self.recorder.event(vm, "Warning", "FailedDelete", f"Error deleting virtual machine instance "
                                      f"{meta['name']}: {exc.status.get('message', exc)}")
            raise SyncError("FailedDelete",
                            f"Failure attempting to delete VMI: {exc.status.get('message', exc)}") from exc
        self._deleted[informer.key_of(vm)] = (meta["uid"], time.monotonic())
        log.info("VM %s/%s stopped: deleted VMI %s", vm["metadata"].get("namespace"), vm["metadata"]["name"],
                 meta["uid"])
        await self.recorder.event(vm, "Normal", "SuccessfulDelete", "Stopped the virtual machine by deleting the "
                                  f"virtual machine instance {meta['uid']}")

    async def _add_start_request(self, vm: JSON) -> JSON:
        meta = vm["metadata"]
        reqs = [*_requests(vm), {"action": "Start"}]
        patch = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": {"stateChangeRequests": reqs}}
        try:
            patched = await self.client.patch(VMS, meta["name"], patch, meta.get("namespace"), subresource="status")
        except rest.APIError as exc:
            raise SyncError("FailedDelete", f"failed to patch VM with start action: {exc}") from exc
        self._writes.wrote(informer.key_of(vm), meta["resourceVersion"])
        return patched

    async def _set_always(self, vm: JSON) -> None:
        meta = vm["metadata"]
        spec_patch: JSON = {"runStrategy": "Always"} if (vm.get("spec") or {}).get("runStrategy") \
            else {"running": True}
        patch = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "spec": spec_patch}
        try:
            await self.client.patch(VMS, meta["name"], patch, meta.get("namespace"))
            self._writes.wrote(informer.key_of(vm), meta["resourceVersion"])
        except rest.Conflict:
            self.queue.add_after(informer.key_of(vm), 0.1)

    async def _bump_generation(self, vm: JSON, vmi: JSON | None) -> JSON | None:
        """conditionallyBumpGenerationAnnotationOnVmi: a VMI still matching the template follows the VM's
        generation (so a runStrategy change does not look like an unobserved template change)."""
        if vmi is None or "resourceVersion" not in vmi["metadata"]:
            return vmi
        generation = str(vm["metadata"].get("generation", 1))
        if (vmi["metadata"].get("annotations") or {}).get(GENERATION_ANNOTATION) == generation:
            return vmi
        if not observes_template(vm, vmi):
            return vmi
        patch = {"metadata": {"annotations": {GENERATION_ANNOTATION: generation},
                              "resourceVersion": vmi["metadata"]["resourceVersion"]}}
        try:
            return await self.client.patch(VMIS, vmi["metadata"]["name"], patch, vmi["metadata"].get("namespace"))
        except (rest.NotFound, rest.Conflict):
            return vmi

    async def _sync_datavolumes(self, vm: JSON) -> bool:
        """handleDataVolumes: create missing DataVolumes from the templates; True when all are usable."""
        templates = (vm.get("spec") or {}).get("dataVolumeTemplates") or []
        if not templates:
            return True
        if (vm["metadata"].get("annotations") or {}).get(IMMEDIATE_DV_ANNOTATION) == "false" \
                and run_strategy(vm) == "Halted":
            return True
        if not (self.dvs.synced.is_set() and self.pvcs.synced.is_set()):
            return False
        ns = vm["metadata"].get("namespace") or ""
        ready = True
        for template in templates:
            name = (template.get("metadata") or {}).get("name", "")
            dv = self.dvs.get(ns, name)
            if dv is None:
                ready = False
                body = datavolume_from_template(vm, template)
                try:
                    await self.client.create(DATAVOLUMES, body, ns)
                except rest.Conflict:
                    continue
                except rest.APIError as exc:
                    message = exc.status.get("message", str(exc))
                    await self.recorder.event(vm, "Warning", "FailedDataVolumeCreate",
                                              f"Error creating DataVolume {name}: {message}")
                    raise SyncError("FailedCreate", f"Error encountered while creating DataVolumes: "
                                    f"failed to create DataVolume: {message}") from exc
                await self.recorder.event(vm, "Normal", "SuccessfulDataVolumeCreate", f"Created DataVolume {name}")
                continue
            phase = (dv.get("status") or {}).get("phase")
            if phase in DV_READY_PHASES:
                continue
            if phase == "Failed":
                await self.recorder.event(vm, "Warning", "FailedDataVolumeImport",
                                          f"DataVolume {name} failed to import disk image")
            ready = False
        return ready

    async def _live_update(self, vm: JSON, vmi: JSON) -> None:
        """LiveUpdate rollout: the VMI follows nodeSelector/affinity/tolerations and the template's hotpluggable
        volumes and NICs (declarative hotplug; the node agent attaches and detaches them)."""
        if is_deleted(vmi) or is_final(vmi) or restart_required(vm, vmi) or "resourceVersion" not in vmi["metadata"]:
            return
        tspec = ((vm.get("spec") or {}).get("template") or {}).get("spec") or {}
        vspec = vmi.get("spec") or {}
        ops: list[JSON] = []
        for k in LIVE_UPDATABLE:
            if tspec.get(k) == vspec.get(k):
                continue
            if tspec.get(k) is None:
                ops.append({"op": "remove", "path": f"/spec/{k}"})
            else:
                ops.append({"op": "add", "path": f"/spec/{k}", "value": tspec[k]})
        ops += _hotplug_ops(tspec, vmi)
        ops += _interface_ops(tspec, vmi)
        if not ops:
            return
        ops.insert(0, {"op": "test", "path": "/metadata/resourceVersion", "value": vmi["metadata"]["resourceVersion"]})
        try:
            await self.client.patch(VMIS, vmi["metadata"]["name"], ops, vmi["metadata"].get("namespace"),
                                    patch_type="json")
        except (rest.NotFound, rest.Conflict):
            return
        except rest.APIError as exc:
            if exc.code == 422:
                return  # the test op failed: a newer VMI is on its way through the watch
            raise

    async def _update_status(self, vm: JSON, vmi: JSON | None, error: SyncError | None, *,
                             start_expected: bool, stop_expected: bool) -> float | None:
        old = vm.get("status") or {}
        status = copy.deepcopy(old)
        now = time.time()
        created = vmi is not None
        status["created"] = created
        status["ready"] = created and _vmi_condition_is(vmi, "Ready", "True")
        if created:
            assert vmi is not None
            gen = (vmi["metadata"].get("annotations") or {}).get(GENERATION_ANNOTATION)
            if gen is not None and gen.isdigit():
                status["observedGeneration"] = int(gen)
                status["desiredGeneration"] = vm["metadata"].get("generation", 1)
        if status.get("runStrategy") or created:
            status["runStrategy"] = run_strategy(vm)
        reqs = trim_state_change_requests(vm, vmi)
        if reqs:
            status["stateChangeRequests"] = reqs
        else:
            status.pop("stateChangeRequests", None)
        failure = next_start_failure(vm, vmi, now)
        if failure is None:
            status.pop("startFailure", None)
        else:
            status["startFailure"] = failure
        conditions = sync_conditions(list(status.get("conditions") or []), vmi, error)
        needs_restart = restart_required(vm, vmi)
        if start_expected or stop_expected or vmi is None:
            needs_restart = False  # a start or stop settles it (cleanupRestartRequired)
        if needs_restart:
            conditions = vmi_ctrl.set_condition(conditions, {
                "type": "RestartRequired", "status": "True", "lastProbeTime": None,
                "lastTransitionTime": vmi_ctrl.now_rfc3339(), "message": RESTART_REQUIRED_MESSAGE})
        elif needs_restart is False:
            conditions = vmi_ctrl.remove_condition(conditions, "RestartRequired")
        status["conditions"] = conditions
        view = {**vm, "status": status}
        status["printableStatus"] = printable_status(
            view, vmi, start_expected=start_expected, stop_expected=stop_expected,
            volumes=self._volumes(vm["metadata"].get("namespace") or ""))
        requeue = None
        if status["printableStatus"] == "CrashLoopBackOff":
            left = backoff_left(view, now)
            requeue = left + 0.5 if left > 0 else None
        if status != old:
            await self._write_status(vm, old, status)
        return requeue

    async def _write_status(self, vm: JSON, old: JSON, status: JSON) -> None:
        meta = vm["metadata"]
        patch = {"metadata": {"resourceVersion": meta["resourceVersion"]},
                 "status": vmi_ctrl.merge_patch_diff(old, status)}
        try:
            await self.client.patch(VMS, meta["name"], patch, meta.get("namespace"), subresource="status")
        except rest.NotFound:
            return
        except rest.Conflict:
            self.queue.add_after(informer.key_of(vm), 0.1)
            return
        self._writes.wrote(informer.key_of(vm), meta["resourceVersion"])
        if old.get("printableStatus") != status.get("printableStatus"):
            log.info("VM %s/%s: %s -> %s", meta.get("namespace"), meta["name"], old.get("printableStatus") or "<none>",
                     status["printableStatus"])
