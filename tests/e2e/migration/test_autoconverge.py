"""The escalation's middle step: a MigrationPolicy that allows auto-converge but not post-copy. The same RAM-
dirtying guest as test_converge.py outruns a 20 MiB/s stream; the source agent raises the downtime limit to the
policy's ceiling, then auto-converge's vCPU throttle (`MigrationAutoConverge`), and QEMU throttles the guest
until the dirty rate fits the stream: the migration completes in pre-copy, with QEMU's throttle (query-migrate
`cpu-throttle-percentage`) in the MigrationCompleted event, and the VMI runs on the target."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from .conftest import Env, vm_manifest, wait_for, wait_ticking
from .test_converge import USER_DATA, dirtied
from .test_migrate import phase, vmims_of

pytestmark = pytest.mark.e2e

THROTTLE = re.compile(r"throttled the vCPUs up to (\d+) %")


@pytest.fixture(scope="module")
def vm(env: Env) -> Iterator[str]:
    env.apply({"apiVersion": "migrations.kubevirt.io/v1alpha1", "kind": "MigrationPolicy",
               "metadata": {"name": "busy-autoconverge"},
               "spec": {"allowAutoConverge": True, "allowPostCopy": False, "maxDowntimeMs": 100,
                        "bandwidthPerMigration": "20Mi",
                        "selectors": {"virtualMachineInstanceSelector": {"workload": "dirty-ac"}}}})  # fmt: skip
    env.apply(vm_manifest("dirty-ac", env.image, memory="256Mi", labels={"workload": "dirty-ac"},
                          user_data=USER_DATA))  # fmt: skip
    yield "dirty-ac"
    env.kubectl("delete", "vm", "dirty-ac", "--wait=false", check=False)
    env.kubectl("delete", "migrationpolicy", "busy-autoconverge", check=False)


def test_dirtying_guest_converges_by_auto_converge(env: Env, vm: str) -> None:
    source = wait_ticking(env, vm)
    wait_for(lambda: len(dirtied(env, source, vm)) >= 2, 180, what="the guest's dirtying loop running")
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
    assert ms["migrationPolicyName"] == "busy-autoconverge"
    cfg = ms["migrationConfiguration"]
    assert cfg["allowAutoConverge"] is True and cfg["allowPostCopy"] is False
    steps = [r for r, _ in reasons if r in ("MigrationDowntimeRaised", "MigrationAutoConverge", "MigrationPostCopy")]
    assert steps == ["MigrationDowntimeRaised", "MigrationAutoConverge"], reasons
    assert ms["mode"] == "PreCopy"  # never switched to post-copy: the policy does not allow it
    done = [m for r, m in reasons if r == "MigrationCompleted"]
    assert done and THROTTLE.search(done[-1]), done
    assert int(THROTTLE.search(done[-1]).group(1)) >= 50, done[-1]  # past the throttle the escalation set
    assert vmi["status"]["phase"] == "Running"
    # Not asserted here: the guest's tick and dirtying loop on the target (test_converge.py checks them after
    # post-copy). After an auto-converged migration the target guest was seen to stay silent for minutes in
    # some runs (2 of 9 on the 2-core CI host under load 7-8), cause not found yet (docs/migration.md).
