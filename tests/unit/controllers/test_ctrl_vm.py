"""The VM controller's pure logic: run strategies, state change requests, backoff, printableStatus."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from virtplane.controllers import virtualmachine as v

JSON = dict[str, Any]
NOW = 1_700_000_000.0


def vm(strategy: str | None = "Always", *, running: bool | None = None, requests: list[JSON] | None = None,
       status: JSON | None = None, deleted: bool = False, volumes: list[JSON] | None = None) -> JSON:
    spec: JSON = {"template": {"metadata": {"labels": {"app": "demo"}, "annotations": {"note": "x"}},
                               "spec": {"domain": {"devices": {}, "resources": {"requests": {"memory": "64Mi"}}},
                                        "volumes": volumes or []}}}
    if strategy is not None:
        spec["runStrategy"] = strategy
    if running is not None:
        spec["running"] = running
    obj: JSON = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                 "metadata": {"name": "vm1", "namespace": "default", "uid": "vm-uid", "generation": 3,
                              "resourceVersion": "10"},
                 "spec": spec, "status": dict(status or {})}
    if requests is not None:
        obj["status"]["stateChangeRequests"] = requests
    if deleted:
        obj["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    return obj


def vmi(phase: str = "Running", *, uid: str = "vmi-uid", deleted: bool = False, conditions: list[JSON] | None = None,
        ran: bool = False, **status: Any) -> JSON:
    st: JSON = {"phase": phase, "conditions": conditions or [], **status}
    if ran or phase == "Running":
        st["phaseTransitionTimestamps"] = [{"phase": "Running", "phaseTransitionTimestamp": "2024-01-01T00:00:00Z"}]
    obj: JSON = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                 "metadata": {"name": "vm1", "namespace": "default", "uid": uid}, "status": st}
    if deleted:
        obj["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    return obj


STOP = {"action": "Stop", "uid": "vmi-uid"}
START = {"action": "Start"}


# ------------------------------------------------------------------------------------------- strategies


def test_legacy_running_maps_to_always_and_halted() -> None:
    assert v.run_strategy(vm(None, running=True)) == "Always"
    assert v.run_strategy(vm(None, running=False)) == "Halted"
    assert v.run_strategy(vm(None)) == "Halted"
    assert v.run_strategy(vm("Manual")) == "Manual"


@pytest.mark.parametrize("case, plan", [
    # Always: keep one VMI; restart final ones and on a Stop request for the current VMI
    (("Always", None, None), v.Plan(start=True)),
    (("Always", "Running", None), v.Plan()),
    (("Always", "Failed", None), v.Plan(stop=True)),
    (("Always", "Succeeded", None), v.Plan(stop=True)),
    (("Always", "Running", [STOP, START]), v.Plan(stop=True)),
    (("Always", "Running", [{"action": "Stop", "uid": "other"}]), v.Plan()),
    # RerunOnFailure: a failed VMI is replaced via a Start request; a succeeded one stays stopped
    (("RerunOnFailure", None, None), v.Plan(start=True)),  # status.runStrategy not set yet: first start
    (("RerunOnFailure", "Failed", None), v.Plan(stop=True, add_start_request=True)),
    (("RerunOnFailure", "Succeeded", None), v.Plan(stop=True)),
    (("RerunOnFailure", "Running", [STOP]), v.Plan(stop=True)),
    (("RerunOnFailure", "Running", None), v.Plan()),
    # Manual: only requests act
    (("Manual", None, None), v.Plan()),
    (("Manual", None, [START]), v.Plan(start=True)),
    (("Manual", "Running", [STOP]), v.Plan(stop=True)),
    (("Manual", "Failed", None), v.Plan()),
    # Halted: no VMI; a Start request (start --paused) flips the spec
    (("Halted", None, None), v.Plan()),
    (("Halted", "Running", None), v.Plan(stop=True)),
    (("Halted", None, [{"action": "Start", "data": {"startPaused": "true"}}]), v.Plan(set_always=True)),
    # Once: start once, never again
    (("Once", None, None), v.Plan(start=True)),
    (("Once", "Succeeded", None), v.Plan()),
    (("Once", "Failed", None), v.Plan()),
])
def test_run_strategy_decisions(case: tuple[str, str | None, list[JSON] | None], plan: v.Plan) -> None:
    strategy, phase, requests = case
    current = vmi(phase) if phase else None
    assert v.plan_run_strategy(vm(strategy, requests=requests), current, NOW) == plan


def test_a_vmi_already_being_deleted_is_not_deleted_again() -> None:
    assert v.plan_run_strategy(vm("Halted"), vmi("Running", deleted=True), NOW) == v.Plan()
    assert v.plan_run_strategy(vm("Always"), vmi("Failed", deleted=True), NOW) == v.Plan()


def test_rerun_on_failure_after_it_was_stopped_needs_a_start_request() -> None:
    stopped = vm("RerunOnFailure", status={"runStrategy": "RerunOnFailure"})
    assert v.plan_run_strategy(stopped, None, NOW) == v.Plan()
    assert v.plan_run_strategy(vm("RerunOnFailure", requests=[START], status={"runStrategy": "RerunOnFailure"}),
                               None, NOW) == v.Plan(start=True)
    # coming from another strategy starts it
    assert v.plan_run_strategy(vm("RerunOnFailure", status={"runStrategy": "Halted"}), None, NOW) == v.Plan(start=True)


def test_backoff_delays_the_next_start() -> None:
    retry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW + 30))
    looping = vm("Always", status={"startFailure": {"consecutiveFailCount": 2, "retryAfterTimestamp": retry}})
    assert v.plan_run_strategy(looping, None, NOW) == v.Plan(requeue_after=30.0)
    assert v.plan_run_strategy(looping, None, NOW + 31) == v.Plan(start=True)


def test_trimming_state_change_requests() -> None:
    # a Stop is done once the VMI it named is gone (or replaced)
    assert v.trim_state_change_requests(vm(requests=[STOP, START]), None) == [START]
    assert v.trim_state_change_requests(vm(requests=[STOP, START]), vmi(uid="new")) == [START]
    assert v.trim_state_change_requests(vm(requests=[STOP, START]), vmi()) == [STOP, START]
    # a Start is done once a live VMI exists
    assert v.trim_state_change_requests(vm(requests=[START]), vmi("Scheduling")) == []
    assert v.trim_state_change_requests(vm(requests=[START]), vmi("Failed")) == [START]
    assert v.trim_state_change_requests(vm(requests=[START]), vmi("Running", deleted=True)) == [START]
    assert v.trim_state_change_requests(vm(requests=[START]), None) == [START]


# ------------------------------------------------------------------------------------------- crash loops


def test_backoff_grows_quadratically_with_jitter_and_a_cap() -> None:
    rng = random.Random(1)
    for count, low in ((1, 10), (2, 40), (3, 90), (4, 160)):
        got = v.start_backoff_seconds(count, rng=rng)
        assert low <= got <= min(low + low // 2, 300)
    assert v.start_backoff_seconds(10, rng=rng) == 300


def test_start_failure_counts_vmis_that_never_ran() -> None:
    first = v.next_start_failure(vm("Always"), vmi("Failed", uid="a"), NOW, random.Random(0))
    assert first is not None and first["consecutiveFailCount"] == 1 and first["lastFailedVMIUID"] == "a"
    again = vm("Always", status={"startFailure": first})
    assert v.next_start_failure(again, vmi("Failed", uid="a"), NOW) == first  # counted once per VMI
    second = v.next_start_failure(again, vmi("Failed", uid="b"), NOW, random.Random(0))
    assert second is not None and second["consecutiveFailCount"] == 2
    assert v.next_start_failure(again, None, NOW) == first  # kept while the VM waits
    assert v.next_start_failure(again, vmi("Failed", uid="c", ran=True), NOW) is None  # it ran: reset
    assert v.next_start_failure(vm("Manual", status={"startFailure": first}), None, NOW) is None


# ------------------------------------------------------------------------------------------- printableStatus


def cond(ctype: str, status: str, reason: str = "") -> JSON:
    return {"type": ctype, "status": status, "reason": reason}


@pytest.mark.parametrize("name, the_vm, the_vmi, kw, want", [
    ("halted", vm("Halted"), None, {}, "Stopped"),
    ("start expected", vm("Always"), None, {"start_expected": True}, "Starting"),
    ("pending", vm(), vmi("Pending"), {}, "Starting"),
    ("scheduling", vm(), vmi("Scheduling"), {}, "Starting"),
    ("scheduled", vm(), vmi("Scheduled"), {}, "Starting"),
    ("unprocessed", vm(), vmi(""), {}, "Starting"),
    ("running", vm(), vmi("Running"), {}, "Running"),
    ("paused", vm(), vmi("Running", conditions=[cond("Paused", "True")]), {}, "Paused"),
    ("stopping", vm(), vmi("Running", deleted=True), {}, "Stopping"),
    ("stop expected", vm(), vmi("Running"), {"stop_expected": True}, "Stopping"),
    ("terminating wins", vm(deleted=True), vmi("Running", deleted=True), {}, "Terminating"),
    ("succeeded", vm("Once"), vmi("Succeeded", ran=True), {}, "Stopped"),
    ("migrating", vm(), vmi("Running", migrationState={"startTimestamp": "t"}), {}, "Migrating"),
    ("migrated", vm(), vmi("Running", migrationState={"startTimestamp": "t", "completed": True}), {}, "Running"),
    ("unschedulable", vm(), vmi("Scheduling", conditions=[cond("PodScheduled", "False", "Unschedulable")]), {},
     "ErrorUnschedulable"),
    ("pvc not found", vm(), vmi("Pending", conditions=[cond("Synchronized", "False", "FailedPvcNotFound"),
                                                       cond("PodScheduled", "False", "Unschedulable")]), {},
     "ErrorPvcNotFound"),
    ("image pull", vm(), vmi("Scheduling", conditions=[cond("Synchronized", "False", "ErrImagePull")]), {},
     "ErrImagePull"),
    ("image backoff", vm(), vmi("Scheduled", conditions=[cond("Synchronized", "False", "ImagePullBackOff")]), {},
     "ImagePullBackOff"),
    ("crash loop", vm(status={"startFailure": {"consecutiveFailCount": 1}}), None, {}, "CrashLoopBackOff"),
    ("crash loop final vmi", vm(status={"startFailure": {"consecutiveFailCount": 2}}), vmi("Failed"), {},
     "CrashLoopBackOff"),
    ("crash loop but manual", vm("Manual", status={"startFailure": {"consecutiveFailCount": 2}}), None, {},
     "Stopped"),
    ("unknown phase", vm(), vmi("Unknown"), {}, "Unknown"),
])
def test_printable_status(name: str, the_vm: JSON, the_vmi: JSON | None, kw: JSON, want: str) -> None:
    assert v.printable_status(the_vm, the_vmi, **kw) == want, name


def test_printable_status_from_storage() -> None:
    dv_vol = [{"name": "root", "dataVolume": {"name": "root-dv"}}]
    pvc_vol = [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]

    def dv(phase: str, **extra: Any) -> JSON:
        return {"metadata": {"name": "root-dv"}, "status": {"phase": phase, **extra}}

    def status(the_vm: JSON, vols: v.Volumes) -> str:
        return v.printable_status(the_vm, None, volumes=vols)

    assert status(vm(volumes=dv_vol), v.Volumes(dvs={"root-dv": dv("ImportInProgress")})) == "Provisioning"
    assert status(vm(volumes=dv_vol), v.Volumes(dvs={"root-dv": dv("Failed")})) == "DataVolumeError"
    running_error = dv("ImportInProgress", conditions=[cond("Running", "False", "Error")])
    assert status(vm(volumes=dv_vol), v.Volumes(dvs={"root-dv": running_error})) == "DataVolumeError"
    assert status(vm(volumes=dv_vol), v.Volumes(dvs={"root-dv": dv("WaitForFirstConsumer")})) == "Stopped"
    assert status(vm(volumes=dv_vol), v.Volumes(dvs={"root-dv": dv("Succeeded")})) == "Stopped"
    pending = {"data": {"metadata": {"name": "data"}, "status": {"phase": "Pending"}}}
    assert status(vm(volumes=pvc_vol), v.Volumes(pvcs=pending)) == "WaitingForVolumeBinding"
    assert status(vm("Halted", volumes=pvc_vol), v.Volumes(pvcs=pending)) == "Stopped"


# ------------------------------------------------------------------------------------------- conditions


def test_conditions_mirror_the_vmi() -> None:
    the_vmi = vmi("Running", conditions=[
        {"type": "Ready", "status": "True", "lastTransitionTime": "t1"},
        {"type": "LiveMigratable", "status": "False", "reason": "DisksNotLiveMigratable"},
    ])
    old = [{"type": "Paused", "status": "True"}, {"type": "RestartRequired", "status": "True"}]
    got = {c["type"]: c for c in v.sync_conditions(old, the_vmi, None)}
    assert set(got) == {"Ready", "LiveMigratable", "RestartRequired"}  # Paused left the VMI, so it leaves the VM
    assert got["Ready"]["status"] == "True" and got["Ready"]["lastTransitionTime"] == "t1"
    none = {c["type"]: c for c in v.sync_conditions([], None, v.SyncError("FailedCreate", "boom"))}
    assert none["Ready"]["reason"] == "VMINotExists" and none["Failure"]["message"] == "boom"
    missing = v.sync_conditions([], vmi("Pending"), None)
    assert missing[0]["reason"] == "VMIConditionMissing"


def test_condition_timestamps_survive_unchanged_reconciles() -> None:
    first = v.sync_conditions([], None, None)
    second = v.sync_conditions([{**first[0], "lastTransitionTime": "earlier"}], None, None)
    assert second[0]["lastTransitionTime"] == "earlier"


# ------------------------------------------------------------------------------------------- the VMI


def test_vmi_from_vm() -> None:
    the_vm = vm("Manual", requests=[{"action": "Start", "data": {"startPaused": "true"}}])
    got = v.vmi_from_vm(the_vm)
    meta = got["metadata"]
    assert meta["name"] == "vm1" and meta["namespace"] == "default"
    assert meta["labels"] == {"app": "demo", "kubevirt.io/vm": "vm1"}
    assert meta["annotations"]["note"] == "x" and meta["annotations"]["kubevirt.io/vm-generation"] == "3"
    assert meta["ownerReferences"] == [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": "vm1",
                                        "uid": "vm-uid", "controller": True, "blockOwnerDeletion": True}]
    assert got["spec"]["startStrategy"] == "Paused"
    assert got["spec"]["domain"]["firmware"]["uuid"]  # stable, name-derived when the VM has none
    assert v.vmi_from_vm(vm("Always"))["spec"].get("startStrategy") is None


def test_restart_required_ignores_live_updatable_fields() -> None:
    the_vm = vm()
    started = v.vmi_from_vm(the_vm)
    assert v.restart_required(the_vm, started) is False
    the_vm["spec"]["template"]["spec"]["nodeSelector"] = {"zone": "a"}
    the_vm["spec"]["template"]["metadata"]["labels"]["extra"] = "y"
    assert v.restart_required(the_vm, started) is False
    the_vm["spec"]["template"]["spec"]["domain"]["resources"]["requests"]["memory"] = "128Mi"
    assert v.restart_required(the_vm, started) is True
    assert v.restart_required(the_vm, None) is None
    assert v.restart_required(the_vm, vmi()) is None  # not started by us: unknown


def test_observed_generation_follows_live_updates_and_metadata() -> None:
    the_vm = vm()
    started = v.vmi_from_vm(the_vm)
    assert v.observes_template(the_vm, started)
    the_vm["spec"]["template"]["spec"]["tolerations"] = [{"operator": "Exists"}]
    assert not v.observes_template(the_vm, started)  # not carried over yet
    started["spec"]["tolerations"] = [{"operator": "Exists"}]
    assert v.observes_template(the_vm, started)  # applied live: observed (unlike kubevirt#18700)
    the_vm["spec"]["template"]["metadata"]["labels"]["new"] = "label"
    assert not v.observes_template(the_vm, started)
    the_vm = vm()
    the_vm["spec"]["template"]["spec"]["domain"]["devices"]["autoattachSerialConsole"] = False
    assert not v.observes_template(the_vm, v.vmi_from_vm(vm()))


def test_datavolume_from_template_is_owned_by_the_vm() -> None:
    the_vm = vm()
    dv = v.datavolume_from_template(the_vm, {"metadata": {"name": "root", "labels": {"a": "b"}},
                                             "spec": {"source": {"blank": {}}, "storage": {}}})
    assert dv["kind"] == "DataVolume" and dv["metadata"]["name"] == "root"
    assert dv["metadata"]["labels"] == {"a": "b"} and dv["metadata"]["ownerReferences"][0]["uid"] == "vm-uid"
    assert dv["spec"] == {"source": {"blank": {}}, "storage": {}}
