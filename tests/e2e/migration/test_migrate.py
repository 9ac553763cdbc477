"""Live migration between node agents in separate network namespaces, observed as a user would: the VMIM's
phases, the VMI's node and migrationState, and the guest's own tick counter, which must continue on the
target without a reset (the same guest, not a reboot)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from .conftest import Env, vm_manifest, wait_for, wait_ticking

pytestmark = pytest.mark.e2e


def vmims_of(env: Env, vmi: str) -> list[dict[str, Any]]:
    items = json.loads(env.kubectl("get", "vmim", "-o", "json").stdout)["items"]
    return sorted((m for m in items if m["spec"]["vmiName"] == vmi), key=lambda m: m["metadata"]["creationTimestamp"])


def phase(m: dict[str, Any] | None) -> str:
    return ((m or {}).get("status") or {}).get("phase", "")


def alive(pid: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


@pytest.fixture(scope="module")
def vm(env: Env) -> Any:
    # a MigrationPolicy selecting the VMI by label: its settings override the cluster's for this migration
    env.apply({"apiVersion": "migrations.kubevirt.io/v1alpha1", "kind": "MigrationPolicy",
               "metadata": {"name": "converge"},
               "spec": {"allowAutoConverge": True,
                        "selectors": {"virtualMachineInstanceSelector": {"workload": "busy"}}}})  # fmt: skip
    env.apply(vm_manifest("mig", env.image, labels={"workload": "busy"}))
    yield "mig"
    env.kubectl("delete", "vm", "mig", "--wait=false", check=False)
    env.kubectl("delete", "migrationpolicy", "converge", check=False)


def test_live_migration_keeps_the_guest_running(env: Env, vm: str) -> None:
    source = wait_ticking(env, vm)
    before = env.get("vmi", vm)
    assert before is not None
    source_pid = env.qemu_pid(source, vm)
    assert source_pid is not None
    env.virtctl("migrate", vm)
    wait_for(lambda: phase((vmims_of(env, vm) or [None])[-1]) in ("Succeeded", "Failed"), 180, what="VMIM done")
    vmim = vmims_of(env, vm)[-1]
    assert phase(vmim) == "Succeeded", json.dumps(vmim.get("status"))
    after = env.get("vmi", vm)
    assert after is not None
    target = after["status"]["nodeName"]
    assert target != source
    assert after["metadata"]["labels"]["kubevirt.io/nodeName"] == target
    ms = after["status"]["migrationState"]
    assert ms["completed"] is True and ms["sourceNode"] == source and ms["targetNode"] == target
    assert ms["startTimestamp"] and ms["endTimestamp"] and not ms.get("failed")
    assert after["status"]["migrationMethod"] == "LiveMigration"
    assert ms["migrationPolicyName"] == "converge" and ms["migrationConfiguration"]["allowAutoConverge"] is True
    assert after["status"]["phase"] == "Running"
    # the same guest: the tick counter and uptime continue on the target, no reboot
    last_source = env.ticks(source, vm)[-1] if env.ticks(source, vm) else None
    wait_for(lambda: len(env.ticks(target, vm)) >= 2, 60, what="ticks on the target")
    first_target = env.ticks(target, vm)[0]
    assert first_target[0] > 3, f"tick counter restarted on the target: {first_target}"
    if last_source is not None:
        assert first_target[0] >= last_source[0] and first_target[1] >= last_source[1]
    # the source QEMU is gone, its runtime dir removed; the address and MAC are unchanged
    wait_for(lambda: not alive(source_pid), 30, what="source QEMU gone")
    wait_for(lambda: not env.runtime_dir(source, vm).exists(), 30, what="source runtime dir removed")
    ifaces_before = [(i.get("mac"), i.get("ipAddress")) for i in before["status"].get("interfaces") or []]
    ifaces_after = [(i.get("mac"), i.get("ipAddress")) for i in after["status"].get("interfaces") or []]
    assert ifaces_before == ifaces_after
    target_pid = env.qemu_pid(target, vm)
    agent_pid = int((env.cluster.data_dir / "nodes" / target / "agent.pid").read_text())
    assert target_pid is not None and os.readlink(f"/proc/{target_pid}/ns/net") == \
        os.readlink(f"/proc/{agent_pid}/ns/net")
