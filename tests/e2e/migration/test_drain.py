"""`kubectl drain` of a node running three VMs with mixed eviction strategies: LiveMigrate and
LiveMigrateIfPossible VMs are live-migrated away (the eviction answered 429 until they moved: same VMI, guest
still counting), the VM with None is shut down and restarted elsewhere by its runStrategy; uncordon restores."""

from __future__ import annotations

import json

import pytest

from .conftest import Env, vm_manifest, wait_for, wait_ticking

pytestmark = pytest.mark.e2e

VMS = {"drain-live": "LiveMigrate", "drain-none": "None", "drain-maybe": "LiveMigrateIfPossible"}


def test_drain_migrates_or_restarts_by_eviction_strategy(env: Env) -> None:
    nodes = sorted(n["metadata"]["name"] for n in json.loads(env.kubectl("get", "nodes", "-o", "json").stdout)["items"])
    victim, others = nodes[0], nodes[1:]
    for n in others:  # everything lands on the victim
        env.kubectl("cordon", n)
    try:
        for name, strategy in VMS.items():
            env.apply(vm_manifest(name, env.image, eviction=strategy))
        before = {}
        for name in VMS:
            assert wait_ticking(env, name) == victim
            vmi = env.get("vmi", name)
            assert vmi is not None
            before[name] = (vmi["metadata"]["uid"], env.ticks(victim, name)[-1][0])
    finally:
        for n in others:
            env.kubectl("uncordon", n)
    try:
        drain = env.kubectl("drain", victim, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=300s",
                            timeout=330, check=False)
        assert drain.returncode == 0, drain.stderr
        node = json.loads(env.kubectl("get", "node", victim, "-o", "json").stdout)
        assert node["spec"].get("unschedulable") is True
        for name in ("drain-live", "drain-maybe"):  # migrated: the same VMI and guest, on another node
            vmi = env.get("vmi", name)
            assert vmi is not None and vmi["metadata"]["uid"] == before[name][0]
            target = vmi["status"]["nodeName"]
            assert target != victim
            wait_for(lambda n=name, t=target: env.ticks(t, n) and env.ticks(t, n)[0][0] > before[n][1], 60,
                     what=f"{name} ticking on {target} from where it was")
        # shut down and restarted elsewhere: a new VMI
        wait_for(lambda: (v := env.get("vmi", "drain-none")) and v["metadata"]["uid"] != before["drain-none"][0]
                 and (v.get("status") or {}).get("phase") == "Running", 180, what="drain-none restarted")
        assert env.vmi_node("drain-none") != victim
        assert "429" in drain.stderr or "evict" in drain.stderr + drain.stdout
    finally:
        env.kubectl("uncordon", victim, check=False)
        for name in VMS:
            env.kubectl("delete", "vm", name, "--wait=false", check=False)
    node = json.loads(env.kubectl("get", "node", victim, "-o", "json").stdout)
    assert not node["spec"].get("unschedulable")
