"""A guest that keeps dirtying its RAM faster than the stream can carry it never converges on its own (KubeVirt
#3504). The source agent escalates within the MigrationPolicy's bounds: the downtime limit doubles up to
maxDowntimeMs, then (allowPostCopy) the migration switches to post-copy. The migration must succeed, the guest
keep running (its tick and its dirtying loop continue on the target, no reboot), and the VMI's migrationState
and events must say what happened.

The guest's user-data script copies a 32 MiB non-zero file in /dev/shm onto itself in a loop (QEMU sends zero
pages almost for free, so they must not be zeros) and reports `virtplane-guest: dirtied N` every 10 rounds on
its console. The policy caps the stream at 20 MiB/s (bandwidthPerMigration) so that the loop outruns it
whatever the host's load: 32 MiB dirty again every pass, where a 100 ms switch-over could carry 2 MiB."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from .conftest import Env, vm_manifest, wait_for, wait_ticking
from .test_migrate import phase, vmims_of

pytestmark = pytest.mark.e2e

DIRTIED = re.compile(r"virtplane-guest: dirtied (\d+)")
USER_DATA = """#!/bin/sh
yes virtplane-dirty-page | head -c 33554432 > /dev/shm/buf
(
i=0
while :; do
	dd if=/dev/shm/buf of=/dev/shm/buf bs=1M count=32 conv=notrunc 2>/dev/null
	i=$((i + 1))
	[ $((i % 10)) = 0 ] && echo "virtplane-guest: dirtied $i" > /dev/hvc0
done
) </dev/null >/dev/null 2>&1 &
"""


def dirtied(env: Env, node: str, vm: str) -> list[int]:
    return [int(n) for n in DIRTIED.findall(env.guest_log(node, vm))]


@pytest.fixture(scope="module")
def vm(env: Env) -> Iterator[str]:
    env.apply({"apiVersion": "migrations.kubevirt.io/v1alpha1", "kind": "MigrationPolicy",
               "metadata": {"name": "busy-postcopy"},
               "spec": {"allowPostCopy": True, "maxDowntimeMs": 100, "bandwidthPerMigration": "20Mi",
                        "selectors": {"virtualMachineInstanceSelector": {"workload": "dirty"}}}})  # fmt: skip
    env.apply(vm_manifest("dirty", env.image, memory="256Mi", labels={"workload": "dirty"}, user_data=USER_DATA))
    yield "dirty"
    env.kubectl("delete", "vm", "dirty", "--wait=false", check=False)
    env.kubectl("delete", "migrationpolicy", "busy-postcopy", check=False)


def test_memory_dirtying_guest_converges_by_escalation(env: Env, vm: str) -> None:
    source = wait_ticking(env, vm)
    wait_for(lambda: len(dirtied(env, source, vm)) >= 2, 180, what="the guest's dirtying loop running")
    before = dirtied(env, source, vm)[-1]
    env.virtctl("migrate", vm)
    wait_for(lambda: phase((vmims_of(env, vm) or [None])[-1]) in ("Succeeded", "Failed"), 300, what="VMIM done")
    vmim = vmims_of(env, vm)[-1]
    reasons = [(e["reason"], e["message"]) for e in env.events_of(vm)]
    assert phase(vmim) == "Succeeded", json.dumps({"status": vmim.get("status"), "events": reasons})

    vmi = env.get("vmi", vm)
    assert vmi is not None
    ms = vmi["status"]["migrationState"]
    target = vmi["status"]["nodeName"]
    assert target != source and ms["completed"] is True and not ms.get("failed")
    assert ms["migrationPolicyName"] == "busy-postcopy"
    assert ms["migrationConfiguration"]["maxDowntimeMs"] == 100 and ms["migrationConfiguration"]["allowPostCopy"]
    # the escalation, in order: the downtime limit up to the policy's 100 ms (from 50), then post-copy
    steps = [(r, m) for r, m in reasons if r in ("MigrationDowntimeRaised", "MigrationAutoConverge",
                                                 "MigrationPostCopy")]  # fmt: skip
    assert [r for r, _ in steps] == ["MigrationDowntimeRaised", "MigrationPostCopy"], steps
    assert "raised to 100 ms" in steps[0][1]
    assert ms["mode"] == "PostCopy"
    # the same guest, still dirtying its RAM on the target: both counters continue, nothing restarted
    wait_for(lambda: len(dirtied(env, target, vm)) >= 2, 120, what="the dirtying loop on the target")
    assert dirtied(env, target, vm)[0] > before, (before, dirtied(env, target, vm))
    wait_for(lambda: len(env.ticks(target, vm)) >= 2, 60, what="ticks on the target")
    assert env.ticks(target, vm)[0][0] > 3
