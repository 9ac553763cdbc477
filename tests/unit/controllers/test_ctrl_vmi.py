"""The VMI controller's pure logic: the launcher pod, QoS, LiveMigratable, volumes, merge patches."""

from __future__ import annotations

import time
from typing import Any

import pytest

from virtplane.controllers import vmi as c

JSON = dict[str, Any]


def vmi(**spec: Any) -> JSON:
    base: JSON = {
        "domain": {"cpu": {"sockets": 1, "cores": 1, "threads": 1}, "devices": {"interfaces": [
            {"name": "default", "masquerade": {}}]}, "memory": {"guest": "128Mi"},
            "resources": {"requests": {"memory": "128Mi"}}},
        "networks": [{"name": "default", "pod": {}}],
        "terminationGracePeriodSeconds": 180,
    }
    base.update(spec)
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": "vm1", "namespace": "ns", "uid": "uid-1",
                         "labels": {"kubevirt.io/vm": "vm1", "app": "demo"}, "annotations": {}},
            "spec": base, "status": {}}


# ------------------------------------------------------------------------------------------- launcher pod


def test_launcher_pod_matches_the_contract() -> None:
    the_vmi = vmi(nodeSelector={"disk": "ssd"}, tolerations=[{"key": "k", "operator": "Exists"}],
                  affinity={"nodeAffinity": {}})
    pod = c.launcher_pod(the_vmi)
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["generateName"] == "virt-launcher-vm1-" and meta["namespace"] == "ns"
    assert meta["labels"] == {"kubevirt.io/vm": "vm1", "app": "demo", "kubevirt.io": "virt-launcher",
                              "kubevirt.io/created-by": "uid-1", "vm.kubevirt.io/name": "vm1"}
    assert meta["annotations"]["kubevirt.io/domain"] == "vm1"
    assert meta["ownerReferences"] == [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                                        "name": "vm1", "uid": "uid-1", "controller": True,
                                        "blockOwnerDeletion": True}]
    assert [ct["name"] for ct in spec["containers"]] == ["compute"]
    assert spec["containers"][0]["resources"] == {"requests": {"memory": "192Mi", "cpu": "100m"}}
    assert spec["nodeSelector"] == {"disk": "ssd", "kubevirt.io/schedulable": "true"}
    assert spec["tolerations"] == [{"key": "k", "operator": "Exists"}] and spec["affinity"] == {"nodeAffinity": {}}
    assert spec["schedulerName"] == "default-scheduler" and spec["restartPolicy"] == "Never"
    assert spec["terminationGracePeriodSeconds"] == 195  # the VMI's grace + 15s, as KubeVirt
    assert spec["hostname"] == "vm1"


def test_launcher_pod_never_carries_a_node_label_of_its_own() -> None:
    the_vmi = vmi()
    the_vmi["metadata"]["labels"]["kubevirt.io/nodeName"] = "old-node"
    assert "kubevirt.io/nodeName" not in c.launcher_pod(the_vmi)["metadata"]["labels"]


@pytest.mark.parametrize("domain, want", [
    ({"memory": {"guest": "1Gi"}}, {"requests": {"memory": "1088Mi", "cpu": "100m"}}),
    ({"memory": {"guest": "1Gi"}, "cpu": {"sockets": 2, "cores": 2, "threads": 1}},
     {"requests": {"memory": "1088Mi", "cpu": "400m"}}),  # 100m per vCPU without an explicit request
    ({"resources": {"requests": {"memory": "512Mi", "cpu": "1500m"}}, "memory": {"guest": "256Mi"}},
     {"requests": {"memory": "576Mi", "cpu": "1500m"}}),  # the request wins over guest memory
    ({"resources": {"requests": {"memory": "1G", "cpu": "2"}, "limits": {"memory": "1G", "cpu": "2"}}},
     {"requests": {"memory": str(10**9 + 64 * 2**20), "cpu": "2"},
      "limits": {"memory": str(10**9 + 64 * 2**20), "cpu": "2"}}),
])
def test_launcher_resources(domain: JSON, want: JSON) -> None:
    assert c.launcher_resources(vmi(domain=domain)) == want


def test_hostname_is_sanitized() -> None:
    the_vmi = vmi(hostname="my.host")
    assert c.pod_hostname(the_vmi) == "my-host"
    long = vmi()
    long["metadata"]["name"] = "x" * 70
    assert len(c.pod_hostname(long)) == 63


@pytest.mark.parametrize("resources, want", [
    ([{}], "BestEffort"),
    ([{"requests": {"memory": "1Gi"}}], "Burstable"),
    ([{"requests": {"memory": "1Gi", "cpu": "1"}, "limits": {"memory": "1Gi", "cpu": "1"}}], "Guaranteed"),
    ([{"limits": {"memory": "1Gi", "cpu": "1"}}], "Guaranteed"),  # requests default to limits
    ([{"requests": {"memory": "1Gi", "cpu": "500m"}, "limits": {"memory": "1Gi", "cpu": "1"}}], "Burstable"),
    ([{"limits": {"memory": "1Gi", "cpu": "1"}}, {}], "Burstable"),
])
def test_qos_class(resources: list[JSON], want: str) -> None:
    spec = {"containers": [{"name": f"c{i}", "resources": r} for i, r in enumerate(resources)]}
    assert c.qos_class(spec) == want


# ------------------------------------------------------------------------------------------- LiveMigratable


def pvc(name: str, *modes: str) -> JSON:
    return {"metadata": {"name": name}, "spec": {"accessModes": list(modes)}}


def test_container_disks_and_masquerade_are_migratable() -> None:
    the_vmi = vmi(volumes=[{"name": "root", "containerDisk": {"image": "x"}},
                           {"name": "ci", "cloudInitNoCloud": {"userData": "#cloud-config"}}])
    assert c.live_migratable(the_vmi, {})["status"] == "True"


def test_pvcs_must_be_shared() -> None:
    rwx = vmi(volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "shared"}}])
    assert c.live_migratable(rwx, {"shared": pvc("shared", "ReadWriteMany")})["status"] == "True"
    cond = c.live_migratable(rwx, {"shared": pvc("shared", "ReadWriteOnce")})
    assert cond["status"] == "False" and cond["reason"] == "DisksNotLiveMigratable"
    assert "PVC shared is not shared" in cond["message"]
    unknown = c.live_migratable(rwx, {})
    assert unknown["reason"] == "DisksNotLiveMigratable" and "Unable to determine" in unknown["message"]
    dv = vmi(volumes=[{"name": "d", "dataVolume": {"name": "root"}}])
    assert c.live_migratable(dv, {"root": pvc("root", "ReadWriteOnce")})["reason"] == "DisksNotLiveMigratable"
    bound = {"metadata": {"name": "root"}, "spec": {"accessModes": ["ReadWriteOnce"]},
             "status": {"accessModes": ["ReadWriteMany"]}}
    assert c.live_migratable(dv, {"root": bound})["status"] == "True"  # the bound volume's modes count


def test_host_disks_must_be_shared() -> None:
    local = vmi(volumes=[{"name": "h", "hostDisk": {"path": "/x.img", "type": "Disk"}}])
    assert c.live_migratable(local, {})["message"] == "cannot migrate VMI with non-shared HostDisk"
    shared = vmi(volumes=[{"name": "h", "hostDisk": {"path": "/x.img", "type": "Disk", "shared": True}}])
    assert c.live_migratable(shared, {})["status"] == "True"


def test_bridge_on_the_pod_network_is_not_migratable_without_the_opt_in() -> None:
    bridge = vmi()
    bridge["spec"]["domain"]["devices"]["interfaces"] = [{"name": "default", "bridge": {}}]
    cond = c.live_migratable(bridge, {})
    assert cond["reason"] == "InterfaceNotLiveMigratable"
    bridge["metadata"]["annotations"]["kubevirt.io/allow-pod-bridge-network-live-migration"] = ""
    assert c.live_migratable(bridge, {})["status"] == "True"
    passt = vmi()
    passt["spec"]["domain"]["devices"]["interfaces"] = [{"name": "default", "binding": {"name": "passt"}}]
    assert c.live_migratable(passt, {})["status"] == "True"
    no_interfaces = vmi(networks=[])
    no_interfaces["spec"]["domain"]["devices"]["interfaces"] = []
    assert c.live_migratable(no_interfaces, {})["status"] == "True"


def test_host_devices_are_not_migratable() -> None:
    gpu = vmi()
    gpu["spec"]["domain"]["devices"]["gpus"] = [{"name": "g", "deviceName": "nvidia.com/x"}]
    assert c.live_migratable(gpu, {})["reason"] == "HostDeviceNotLiveMigratable"


# ------------------------------------------------------------------------------------------- volumes


def test_volumes_problem() -> None:
    needs_pvc = vmi(volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}])
    assert c.volumes_problem(needs_pvc, {}, {}) == ("missing",
                                                    "failed to render launch manifest: didn't find PVC data")
    assert c.volumes_problem(needs_pvc, {"data": pvc("data")}, {}) is None
    needs_dv = vmi(volumes=[{"name": "d", "dataVolume": {"name": "root"}}])
    assert c.volumes_problem(needs_dv, {}, {})[0] == "waiting"  # type: ignore[index]
    assert c.volumes_problem(needs_dv, {"root": pvc("root")}, {}) is None  # a PVC of that name will do

    def dv(phase: str) -> dict[str, JSON]:
        return {"root": {"metadata": {"name": "root"}, "status": {"phase": phase}}}

    assert c.volumes_problem(needs_dv, {}, dv("ImportInProgress"))[0] == "waiting"  # type: ignore[index]
    assert c.volumes_problem(needs_dv, {}, dv("Failed"))[0] == "failed"  # type: ignore[index]
    for ok in ("Succeeded", "WaitForFirstConsumer", "PendingPopulation"):
        assert c.volumes_problem(needs_dv, {}, dv(ok)) is None


def test_image_pull_errors_from_container_statuses() -> None:
    pod = {"status": {"containerStatuses": [{"name": "compute", "state": {"waiting": {
        "reason": "ImagePullBackOff", "message": "Back-off pulling image"}}}]}}
    assert c.image_pull_error(pod) == ("ImagePullBackOff", "Back-off pulling image")
    assert c.image_pull_error({"status": {}}) is None


# ------------------------------------------------------------------------------------------- helpers


def test_merge_patch_diff_round_trips() -> None:
    from virtplane.api import patch

    old = {"a": 1, "b": {"x": 1, "y": 2}, "c": [1, 2], "d": {"k": "v"}}
    new = {"a": 1, "b": {"x": 1, "z": 3}, "c": [2], "d": {}, "e": None}
    diff = c.merge_patch_diff(old, new)
    assert diff == {"b": {"y": None, "z": 3}, "c": [2], "d": {"k": None}, "e": None}
    assert patch.json_merge_patch(old, diff) == {"a": 1, "b": {"x": 1, "z": 3}, "c": [2], "d": {}}


def test_set_condition_keeps_timestamps_of_unchanged_conditions() -> None:
    old = [{"type": "Ready", "status": "False", "reason": "R", "message": "m", "lastTransitionTime": "t0"}]
    same = c.set_condition(old, {"type": "Ready", "status": "False", "reason": "R", "message": "m",
                                 "lastTransitionTime": "t1"})
    assert same[0]["lastTransitionTime"] == "t0"
    changed = c.set_condition(old, {"type": "Ready", "status": "True", "lastTransitionTime": "t1"})
    assert changed == [{"type": "Ready", "status": "True", "lastTransitionTime": "t1"}]
    added = c.set_condition(old, {"type": "Paused", "status": "True"})
    assert [x["type"] for x in added] == ["Ready", "Paused"]


def test_lease_alive() -> None:
    now = time.time()

    def lease(age: float, duration: int = 40) -> JSON:
        renew = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(now - age))
        return {"spec": {"renewTime": renew, "leaseDurationSeconds": duration}}

    assert c.lease_alive(lease(5), now)
    assert not c.lease_alive(lease(60), now)
    assert c.lease_alive(lease(60, duration=120), now)
    assert not c.lease_alive(None, now)
    assert not c.lease_alive({"spec": {}}, now)


def test_phase_changes_are_timestamped_once() -> None:
    status: JSON = {}
    c.set_phase(status, "Pending")
    c.set_phase(status, "Pending")
    c.set_phase(status, "Scheduling")
    assert status["phase"] == "Scheduling"
    assert [t["phase"] for t in status["phaseTransitionTimestamps"]] == ["Pending", "Scheduling"]


def test_write_tracker_holds_back_decisions_on_the_version_just_replaced() -> None:
    tracker = c.WriteTracker(timeout=60)
    key = ("ns", "vm1")
    old = {"metadata": {"resourceVersion": "5"}}
    assert not tracker.stale(key, old)
    tracker.wrote(key, "5")
    assert tracker.stale(key, old)  # the cache still shows what we overwrote
    assert not tracker.stale(key, {"metadata": {"resourceVersion": "6"}})  # caught up
    assert not tracker.stale(key, old)  # and forgotten
    expired = c.WriteTracker(timeout=0)
    expired.wrote(key, "5")
    assert not expired.stale(key, old)
