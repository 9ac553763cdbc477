"""virtctl's API verbs against a real `virtplane up` (the session cluster): the desired-state round trips
start/stop/restart, Services for expose, `create vm | kubectl create -f -`, and one-line errors. The
cluster's controllers and node agent act on what these verbs write; what is checked here is the verbs'
side (the full run of a guest is test_full_path.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest
import yaml

from tests.e2e.console.conftest import REPO
from virtplane.testing.cluster import Cluster

pytestmark = pytest.mark.e2e
NS = "default"


def virtctl(cluster: Cluster, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "virtplane.cli.virtctl", "--kubeconfig", str(cluster.kubeconfig),
                           *args], capture_output=True, text=True, cwd=REPO, timeout=60, input=input, check=False)


def get(cluster: Cluster, kind: str, name: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", kind, name, "-n", NS, "-o", "json").stdout)


def _exists(cluster: Cluster, kind: str, name: str) -> bool:
    return cluster.kubectl("get", kind, name, "-n", NS, check=False).returncode == 0


def test_create_vm_output_is_accepted_by_kubectl(cluster: Cluster) -> None:
    out = virtctl(cluster, "create", "vm", "--name", "lc-created", "--run-strategy", "Halted",
                  "--volume-containerdisk", "src:quay.io/containerdisks/fedora:41")
    assert out.returncode == 0, out.stderr
    created = cluster.kubectl("create", "-f", "-", "-n", NS, input=out.stdout)
    assert "virtualmachine.kubevirt.io/lc-created created" in created.stdout
    vm = get(cluster, "vm", "lc-created")
    assert vm["spec"]["runStrategy"] == "Halted"
    assert vm["spec"]["template"]["spec"]["volumes"][0]["containerDisk"]["image"] == \
        "quay.io/containerdisks/fedora:41"


def test_start_stop_restart_round_trip(cluster: Cluster) -> None:
    out = virtctl(cluster, "create", "vm", "--name", "lc-vm", "--run-strategy", "Halted",
                  "--termination-grace-period", "0")
    cluster.kubectl("create", "-f", "-", "-n", NS, input=out.stdout)
    res = virtctl(cluster, "start", "lc-vm", "--dry-run")
    assert res.returncode == 0 and get(cluster, "vm", "lc-vm")["spec"]["runStrategy"] == "Halted"
    res = virtctl(cluster, "start", "lc-vm")
    assert (res.returncode, res.stdout) == (0, "VM lc-vm was scheduled to start\n"), res.stderr
    assert get(cluster, "vm", "lc-vm")["spec"]["runStrategy"] == "Always"
    res = virtctl(cluster, "stop", "lc-vm")
    assert (res.returncode, res.stdout) == (0, "VM lc-vm was scheduled to stop\n"), res.stderr
    assert get(cluster, "vm", "lc-vm")["spec"]["runStrategy"] == "Halted"
    deadline = time.monotonic() + 90  # the controllers may have started it meanwhile: wait until it is gone
    while _exists(cluster, "vmi", "lc-vm"):
        assert time.monotonic() < deadline, "the VMI of a stopped VM did not go away"
        time.sleep(0.5)
    for args, message in [
        (("stop", "lc-vm"), "Error: VM is not running"),
        (("restart", "lc-vm"), "Error: RunStategy Halted does not support manual restart requests"),
        (("stop", "lc-vm", "--grace-period", "0"), "Error: Must both use --force=true and set --grace-period."),
        (("pause", "vm", "lc-vm"), "Error: VM lc-vm is not running"),
        (("migrate", "lc-vm"), "Error: VM lc-vm is not running"),
        (("migrate-cancel", "lc-vm"), "Error: Found no migration to cancel for lc-vm"),
        (("console", "lc-vm"), "Error: VM lc-vm is not running"),
        (("start", "ghost"), 'Error: virtualmachines.kubevirt.io "ghost" not found'),
        (("pause", "vmi", "ghost"), 'Error: virtualmachineinstances.kubevirt.io "ghost" not found'),
        (("guestosinfo", "ghost"), 'Error: virtualmachineinstances.kubevirt.io "ghost" not found'),
        (("port-forward", "vm/ghost", "8080:80"), 'Error: virtualmachines.kubevirt.io "ghost" not found'),
    ]:
        res = virtctl(cluster, *args)
        assert res.returncode == 1, (args, res.stdout, res.stderr)
        assert res.stderr.strip() == message, args
    cluster.kubectl("delete", "vm", "lc-vm", "-n", NS)


def test_expose_vm_creates_a_service(cluster: Cluster) -> None:
    out = virtctl(cluster, "create", "vm", "--name", "lc-web", "--run-strategy", "Halted")
    vm = yaml.safe_load(out.stdout)
    vm["spec"]["template"]["metadata"]["labels"] = {"app": "lc-web"}
    cluster.kubectl("create", "-f", "-", "-n", NS, input=json.dumps(vm))
    res = virtctl(cluster, "expose", "vm", "lc-web", "--name", "lc-web-http", "--port", "80",
                  "--target-port", "8080", "--type", "NodePort")
    assert (res.returncode, res.stdout) == (0, "Service lc-web-http successfully exposed for vm lc-web\n"), res.stderr
    svc = get(cluster, "service", "lc-web-http")
    assert svc["spec"]["selector"] == {"app": "lc-web"} and svc["spec"]["type"] == "NodePort"
    assert svc["spec"]["ports"][0]["port"] == 80 and svc["spec"]["ports"][0]["targetPort"] == 8080
    res = virtctl(cluster, "expose", "vm", "lc-web", "--name", "lc-web-http", "--port", "80")
    assert res.returncode == 1 and res.stderr.startswith("Error: service creation failed:")
    res = virtctl(cluster, "expose", "vmi", "ghost", "--name", "x", "--port", "80")
    assert res.stderr.strip() == 'Error: virtualmachineinstances.kubevirt.io "ghost" not found'


def test_version_and_namespace_flag(cluster: Cluster) -> None:
    res = virtctl(cluster, "version")
    assert res.returncode == 0 and res.stdout.splitlines()[1].startswith("Server Version: version.Info{GitVersion:")
    res = virtctl(cluster, "-n", "kube-public", "start", "lc-vm")
    assert res.stderr.strip() == 'Error: virtualmachines.kubevirt.io "lc-vm" not found'
