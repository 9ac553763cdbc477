"""The seed's migration rules: what cannot live-migrate says why (LiveMigratable condition, a VMIM failing at
once with that reason, admission refusing evictionStrategy LiveMigrate and naming the volume or device), and a
single-node cluster refuses migrations and eviction strategies."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from virtplane.testing.cluster import Cluster

from .conftest import Env, vm_manifest, wait_for

pytestmark = pytest.mark.e2e


def rwo_pvc(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "16Mi"}}}}


def with_pvc(vm: dict[str, Any], claim: str) -> dict[str, Any]:
    spec = vm["spec"]["template"]["spec"]
    spec["domain"]["devices"]["disks"].append({"name": "data", "disk": {"bus": "virtio"}})
    spec["volumes"].append({"name": "data", "persistentVolumeClaim": {"claimName": claim}})
    return vm


def vmim(name: str, vmi: str) -> dict[str, Any]:
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": name}, "spec": {"vmiName": vmi}}


def test_rwo_volume_is_not_live_migratable(env: Env) -> None:
    env.apply(rwo_pvc("rwo-disk"))
    try:
        refused = env.kubectl("apply", "-f", "-", check=False, input=yaml.safe_dump(
            with_pvc(vm_manifest("rwo-evict", env.image, eviction="LiveMigrate"), "rwo-disk")))
        assert refused.returncode != 0
        assert "evictionStrategy" in refused.stderr and "rwo-disk" in refused.stderr
        assert "DisksNotLiveMigratable" in refused.stderr
        env.apply(with_pvc(vm_manifest("rwo", env.image), "rwo-disk"))

        def condition() -> dict[str, Any] | None:
            vmi = env.get("vmi", "rwo") or {}
            return next((c for c in (vmi.get("status") or {}).get("conditions") or []
                         if c["type"] == "LiveMigratable"), None)

        cond = wait_for(condition, 60, what="LiveMigratable condition")
        assert cond["status"] == "False" and cond["reason"] == "DisksNotLiveMigratable"
        env.apply(vmim("rwo-mig", "rwo"))
        wait_for(lambda: ((env.get("vmim", "rwo-mig") or {}).get("status") or {}).get("phase") == "Failed", 60,
                 what="VMIM Failed")
        failed = env.get("vmim", "rwo-mig")
        assert failed is not None
        assert "DisksNotLiveMigratable" in failed["status"]["migrationState"]["failureReason"]
    finally:
        env.kubectl("delete", "vmim", "rwo-mig", "--wait=false", check=False)
        env.kubectl("delete", "vm", "rwo", "--wait=false", check=False)
        env.kubectl("delete", "pvc", "rwo-disk", "--wait=false", check=False)


def test_host_device_refuses_live_migrate_eviction(env: Env) -> None:
    vm = vm_manifest("gpu-evict", env.image, eviction="LiveMigrate")
    vm["spec"]["template"]["spec"]["domain"]["devices"]["gpus"] = [
        {"name": "gpu1", "deviceName": "nvidia.com/TU104GL_Tesla_T4"}]
    refused = env.kubectl("apply", "-f", "-", check=False, input=yaml.safe_dump(vm))
    assert refused.returncode != 0
    assert "gpu1" in refused.stderr, refused.stderr


@pytest.fixture(scope="module")
def single(env: Env) -> Iterator[Env]:
    short = Path(tempfile.mkdtemp(prefix="vps-", dir="/tmp"))
    cluster = Cluster(short / "c", nodes=1)
    try:
        cluster.start()
        e = Env(cluster, env.image)
        wait_for(lambda: len(json.loads(e.kubectl("get", "nodes", "-o", "json").stdout)["items"]) == 1, 60,
                 what="the node")
        yield e
    finally:
        cluster.stop()
        shutil.rmtree(short, ignore_errors=True)


def test_single_node_cluster_refuses_eviction_strategies_and_migrations(single: Env) -> None:
    for strategy in ("LiveMigrate", "LiveMigrateIfPossible", "External"):
        refused = single.kubectl("apply", "-f", "-", check=False, input=yaml.safe_dump(
            vm_manifest("evict", single.image, eviction=strategy)))
        assert refused.returncode != 0 and "single-node cluster" in refused.stderr, refused.stderr
    single.apply(vm_manifest("solo", single.image))
    wait_for(lambda: single.get("vmi", "solo"), 60, what="VMI")
    single.apply(vmim("solo-mig", "solo"))
    wait_for(lambda: ((single.get("vmim", "solo-mig") or {}).get("status") or {}).get("phase") == "Failed", 60,
             what="VMIM Failed")
    failed = single.get("vmim", "solo-mig")
    assert failed is not None and "single-node" in failed["status"]["migrationState"]["failureReason"]


def kubevirt_topology(e: Env) -> dict[str, Any] | None:
    proc = e.kubectl("get", "kubevirt", "topology", "-n", "kubevirt", "-o", "json", check=False)
    if proc.returncode != 0:
        return None
    status = json.loads(proc.stdout).get("status") or {}
    return next((c for c in status.get("conditions") or [] if c.get("type") == "SingleNode"), None)


@pytest.mark.parametrize("cluster", ["single", "env"])
def test_kubevirt_cr_status_reports_the_topology(cluster: str, request: pytest.FixtureRequest) -> None:
    e: Env = request.getfixturevalue(cluster)
    e.kubectl("create", "namespace", "kubevirt", check=False)
    e.apply({"apiVersion": "kubevirt.io/v1", "kind": "KubeVirt", "metadata": {"name": "topology",
                                                                         "namespace": "kubevirt"}, "spec": {}})
    try:
        cond = wait_for(lambda: kubevirt_topology(e), 60, what="the KubeVirt CR's SingleNode condition")
        if cluster == "single":
            assert (cond["status"], cond["reason"]) == ("True", "SingleReplica"), cond
        else:
            assert (cond["status"], cond["reason"]) == ("False", "HighlyAvailable"), cond
        kv = json.loads(e.kubectl("get", "kubevirt", "topology", "-n", "kubevirt", "-o", "json").stdout)
        assert kv["status"]["phase"] == "Deployed"
        assert any(c["type"] == "Available" and c["status"] == "True" for c in kv["status"]["conditions"])
    finally:
        e.kubectl("delete", "kubevirt", "topology", "-n", "kubevirt", check=False)
