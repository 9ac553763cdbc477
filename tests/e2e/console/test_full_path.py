"""virtctl over the full stack: `virtplane up` (API server, VM/VMI controllers, scheduler), a real node agent
(`virtplane node`, which mounts the console routes), a registry with the tiny containerDisk and QEMU (TCG).
Nothing is faked: `virtctl start` → console login → ssh → port-forward → VNC screenshot → guestosinfo →
pause → reset → stop."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from tests.e2e.controllers.test_vm_runtime import get, wait_for
from tests.e2e.node.conftest import NodeAgentProc, component_kubeconfig, requirements
from virtplane.console.rfb import png_size
from virtplane.testing import guest
from virtplane.testing.cluster import REPO, Cluster

pytestmark = pytest.mark.e2e
NAME = "vm-cons"
BOOT = 240.0  # TCG on a busy 2-core machine
KERNEL = re.compile(rb"6\.\d+\.\d+-\d+-cloud-amd64")
PROMPT = re.compile(rb"root@[\w.-]+:[^\r\n]*# ")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    requirements()
    root = tmp_path_factory.mktemp("consolefull")
    key, pub = guest.make_ssh_key(root / "ssh")
    cluster = Cluster(root / "cluster", extra_args=("--nodes", "0"))
    cluster.start()
    agent: NodeAgentProc | None = None
    try:
        with guest.registry_with_containerdisk(root / "registry") as (_reg, image):
            agent = NodeAgentProc(component_kubeconfig(cluster, root / "node.kubeconfig"), root / "node",
                                  root / "node-agent.log")
            agent.start()
            yield {"cluster": cluster, "image": image, "key": key, "pub": pub, "root": root, "agent": agent}
    finally:
        if agent is not None:
            agent.stop()
        for pidfile in (root / "node" / "runtime").glob("*/pid"):  # leftover VMs, by pid
            with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        cluster.stop()


def vm_manifest(image: str, pub: str) -> str:
    user_data = ("#cloud-config\nhostname: cons-full\nssh_authorized_keys:\n"
                 f"  - {pub}\nbootcmd:\n  - mkdir -p /srv/www\n  - echo full-path-ok > /srv/www/index.html\n"
                 "  - httpd -p 8080 -h /srv/www\n")
    return json.dumps({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": NAME},
        "spec": {"runStrategy": "Halted", "template": {
            "metadata": {"labels": {"app": NAME}},
            "spec": {
                "terminationGracePeriodSeconds": 10,
                "domain": {"resources": {"requests": {"memory": "256Mi"}},
                           "devices": {"disks": [{"name": "containerdisk", "disk": {"bus": "virtio"}},
                                                 {"name": "cloudinitdisk", "disk": {"bus": "virtio"}}],
                                       "interfaces": [{"name": "default", "masquerade": {}}]}},
                "networks": [{"name": "default", "pod": {}}],
                "volumes": [{"name": "containerdisk", "containerDisk": {"image": image}},
                            {"name": "cloudinitdisk", "cloudInitNoCloud": {"userData": user_data}}],
            }}},
    })


def virtctl_argv(c: Cluster, *args: str) -> list[str]:
    return [sys.executable, "-m", "virtplane.cli.virtctl", "--kubeconfig", str(c.kubeconfig), *args]


def virtctl(c: Cluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(virtctl_argv(c, *args), capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          check=False)


def vmi_condition(c: Cluster, ctype: str) -> dict[str, Any] | None:
    vmi = get(c, "vmi", NAME) or {}
    return next((x for x in (vmi.get("status") or {}).get("conditions") or [] if x.get("type") == ctype), None)


def test_virtctl_full_path(stack: dict[str, Any], tmp_path: Path) -> None:
    c: Cluster = stack["cluster"]
    wait_for(lambda: (n := get(c, "nodes")) and n["items"], "the node agent's Node", timeout=60, cluster=c)
    c.kubectl("apply", "-f", "-", input=vm_manifest(stack["image"], stack["pub"]))

    res = virtctl(c, "start", NAME)
    assert (res.returncode, res.stdout) == (0, f"VM {NAME} was scheduled to start\n"), res.stderr

    # console waits for the VMI to run (--timeout, minutes), then the guest's login prompt.
    child = pexpect.spawn(*(lambda a: (a[0], a[1:]))(virtctl_argv(c, "console", NAME, "--timeout", "4")),
                          cwd=str(REPO), timeout=BOOT, dimensions=(40, 160))
    try:
        try:
            child.expect(rb"Successfully connected to vm-cons console")
        except pexpect.TIMEOUT as exc:
            raise AssertionError(f"no console; VMI: {json.dumps((get(c, 'vmi', NAME) or {}).get('status'))}\n"
                                 f"VM: {json.dumps((get(c, 'vm', NAME) or {}).get('status'))}\n"
                                 f"agent log: {stack['agent'].log_tail(3000)}\n{c.log_tail(3000)}") from exc
        child.expect(rb"virtplane-guest: ready", timeout=BOOT)
        child.send(b"\r")
        child.expect(rb"login: ")
        child.send(b"root\r")
        child.expect(PROMPT)
        child.send(b"uname -r\r")
        child.expect(KERNEL)
        child.sendcontrol("]")
        child.expect(pexpect.EOF, timeout=15)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0

    ssh_opts = ["-t", "-o StrictHostKeyChecking=no", "-t", "-o UserKnownHostsFile=/dev/null", "-t", "-o LogLevel=ERROR"]
    res = virtctl(c, "ssh", f"root@vm/{NAME}", "-i", str(stack["key"]), *ssh_opts, "-c", "hostname")
    assert (res.returncode, res.stdout.strip()) == (0, "cons-full"), res.stderr

    proc = subprocess.Popen(virtctl_argv(c, "port-forward", f"vm/{NAME}", "0:8080"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        m = re.match(r"Forwarding from 127\.0\.0\.1:(\d+) -> 8080", proc.stdout.readline())
        assert m
        with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/index.html", timeout=30) as resp:
            assert resp.read().decode().strip() == "full-path-ok"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0

    shot = tmp_path / "screen.png"
    res = virtctl(c, "vnc", "screenshot", NAME, "-f", str(shot))
    assert res.returncode == 0, res.stderr
    assert png_size(shot.read_bytes()) == (720, 400)  # the VGA text mode the tiny guest leaves the screen in

    def guest_info() -> dict[str, Any] | None:  # the guest agent connects a little after boot
        res = virtctl(c, "guestosinfo", NAME)
        return json.loads(res.stdout) if res.returncode == 0 else None

    info = wait_for(guest_info, "guestosinfo from the guest agent", timeout=90, cluster=c)
    assert "6." in json.dumps(info)  # the guest's kernel release is in there

    res = virtctl(c, "pause", "vm", NAME)
    assert (res.returncode, res.stdout) == (0, f"VMI {NAME} was scheduled to pause\n"), res.stderr
    wait_for(lambda: (p := vmi_condition(c, "Paused")) and p.get("status") == "True", "Paused condition", cluster=c)
    res = virtctl(c, "unpause", "vm", NAME)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: not (p := vmi_condition(c, "Paused")) or p.get("status") != "True", "unpaused", cluster=c)

    def boots() -> int:
        log = virtctl(c, "console", NAME, "--log")
        return log.stdout.count("virtplane-guest: booted") if log.returncode == 0 else -1

    before = boots()
    res = virtctl(c, "reset", NAME)
    assert (res.returncode, res.stdout) == (0, f"VMI {NAME} was scheduled to reset\n"), res.stderr
    wait_for(lambda: boots() > before, "the guest booting again after reset", timeout=BOOT, cluster=c)

    res = virtctl(c, "stop", NAME)
    assert (res.returncode, res.stdout) == (0, f"VM {NAME} was scheduled to stop\n"), res.stderr
    wait_for(lambda: get(c, "vmi", NAME) is None, "the VMI gone", timeout=90, cluster=c)
    started = time.monotonic()
    res = virtctl(c, "console", NAME, "--timeout", "1")
    assert res.returncode == 1 and res.stderr.strip() == f"Error: VM {NAME} is not running", res.stderr
    assert time.monotonic() - started < 30  # a stopped VM is not waited for
