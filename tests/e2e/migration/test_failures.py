"""Migrations that do not complete: cancelled by deleting the VMIM, or the target QEMU killed mid-stream. Either
way the guest keeps running on the source, the VMIM is Failed with a reason and the target is cleaned up.

A bandwidth cap in the KubeVirt CR (spec.configuration.migrations.bandwidthPerMigration) keeps the stream
running long enough to act on it."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import Env, vm_manifest, wait_for, wait_ticking
from .test_migrate import alive, phase, vmims_of

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def slow(env: Env) -> Iterator[None]:
    env.kubectl("create", "namespace", "kubevirt", check=False)
    env.apply({"apiVersion": "kubevirt.io/v1", "kind": "KubeVirt",
               "metadata": {"name": "kubevirt", "namespace": "kubevirt"},
               "spec": {"configuration": {"migrations": {"bandwidthPerMigration": "1Mi"}}}})  # fmt: skip
    yield
    env.kubectl("delete", "kubevirt", "-n", "kubevirt", "kubevirt", check=False)


@pytest.fixture(scope="module")
def vm(env: Env, slow: None) -> Iterator[str]:
    env.apply(vm_manifest("stuck", env.image))
    yield "stuck"
    env.kubectl("delete", "vm", "stuck", "--wait=false", check=False)


def running_migration(env: Env, vm: str) -> dict[str, Any]:
    env.virtctl("migrate", vm)
    wait_for(lambda: phase((vmims_of(env, vm) or [None])[-1]) in ("Running", "Succeeded", "Failed"), 120,
             what="VMIM Running")
    m = vmims_of(env, vm)[-1]
    assert phase(m) == "Running", json.dumps(m.get("status"))
    return m


def assert_source_survived(env: Env, vm: str, source: str, source_pid: int, target: str) -> None:
    vmi = env.get("vmi", vm)
    assert vmi is not None and vmi["status"]["nodeName"] == source and vmi["status"]["phase"] == "Running"
    assert alive(source_pid)
    n = env.ticks(source, vm)[-1][0]
    wait_for(lambda: env.ticks(source, vm)[-1][0] >= n + 2, 30, what="the guest ticking on the source")
    wait_for(lambda: not env.runtime_dir(target, vm).exists(), 30, what="target runtime dir removed")


def test_cancel_by_deleting_the_vmim(env: Env, vm: str) -> None:
    source = wait_ticking(env, vm)
    source_pid = env.qemu_pid(source, vm)
    assert source_pid is not None
    m = running_migration(env, vm)
    target = m["status"]["migrationState"]["targetNode"]
    env.virtctl("migrate-cancel", vm)
    wait_for(lambda: env.get("vmim", m["metadata"]["name"]) is None, 60, what="VMIM gone")
    vmi = env.get("vmi", vm)
    assert vmi is not None
    ms = vmi["status"]["migrationState"]
    assert ms["abortRequested"] is True and ms["failed"] is True and ms["abortStatus"] == "Succeeded"
    assert_source_survived(env, vm, source, source_pid, target)


def test_target_qemu_killed_mid_migration(env: Env, vm: str) -> None:
    source = wait_ticking(env, vm)
    source_pid = env.qemu_pid(source, vm)
    assert source_pid is not None
    m = running_migration(env, vm)
    target = m["status"]["migrationState"]["targetNode"]
    target_pid = wait_for(lambda: env.qemu_pid(target, vm), 30, what="target QEMU pid")
    os.kill(target_pid, signal.SIGKILL)
    wait_for(lambda: phase(env.get("vmim", m["metadata"]["name"])) == "Failed", 90, what="VMIM Failed")
    failed = env.get("vmim", m["metadata"]["name"])
    assert failed is not None and failed["status"]["migrationState"]["failureReason"]
    assert_source_survived(env, vm, source, source_pid, target)
