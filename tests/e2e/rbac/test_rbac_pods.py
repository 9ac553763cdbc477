"""RBAC on the streams the API server proxies to a node agent (`virtplane up --nodes 1`, pods run with runc,
VMs with QEMU): a viewer reads `kubectl logs` but `kubectl exec` is refused (Kubernetes' 403), an editor
execs; a ServiceAccount token with edit does the same through `kubectl --token`; an editor of a running VM
takes a VNC screenshot, opens its serial console the way the web console does (token subprotocol) and stops
it with virtctl, where a viewer is refused all three."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.e2e.pods.conftest import PodEnv, env, ready  # noqa: F401 - `env` is the fixture this module uses
from virtplane.testing import guest
from virtplane.testing.cluster import REPO
from virtplane.testing.waiting import wait_for

pytestmark = pytest.mark.e2e
NS = "rbac-pods"


def as_user(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", *args], capture_output=True, text=True, timeout=90, check=False,
                          env={**os.environ, "KUBECONFIG": str(kubeconfig),
                               "KUBECACHEDIR": str(kubeconfig.parent / f"kcache-{kubeconfig.stem}")})


def add_user(env: PodEnv, name: str) -> Path:  # noqa: F811
    kubeconfig = env.cluster.data_dir / f"{name}.kubeconfig"
    made = subprocess.run([sys.executable, "-m", "virtplane.cli.main", "user", "add", name, "--kubeconfig",
                           str(env.cluster.kubeconfig), "-o", str(kubeconfig)], capture_output=True, text=True,
                          cwd=REPO, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    return kubeconfig


def virtctl(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "virtplane.cli.virtctl", "--kubeconfig", str(kubeconfig), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120, check=False)


def test_logs_for_viewers_exec_for_editors(env: PodEnv) -> None:  # noqa: F811
    env.kubectl("create", "namespace", NS)
    env.kubectl("apply", "-n", NS, "-f", "-", input=f"""
apiVersion: v1
kind: Pod
metadata: {{name: talker}}
spec:
  containers:
  - name: main
    image: {env.image}
    command: ["sh", "-c", "echo hello-from-talker; exec sleep 3600"]
""")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        got = env.kubectl("get", "pod", "talker", "-n", NS, "-o", "json", check=False)
        if got.returncode == 0 and ready(json.loads(got.stdout)):
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"pod talker not ready; agent log:\n{env.agent_log()[-3000:]}")
    kubeconfig = add_user(env, "pat")
    env.kubectl("create", "rolebinding", "pat-view", "--clusterrole=view", "--user=pat", "-n", NS)
    logs = as_user(kubeconfig, "logs", "talker", "-n", NS)
    assert logs.stdout == "hello-from-talker\n", logs.stderr
    refused = as_user(kubeconfig, "exec", "talker", "-n", NS, "--", "echo", "in")
    assert refused.returncode != 0
    assert 'pods "talker" is forbidden: User "pat" cannot' in refused.stderr
    assert 'resource "pods/exec" in API group "" in the namespace "rbac-pods"' in refused.stderr
    env.kubectl("create", "rolebinding", "pat-edit", "--clusterrole=edit", "--user=pat", "-n", NS)
    ran = as_user(kubeconfig, "exec", "talker", "-n", NS, "--", "sh", "-c", "echo in-$((6*7))")
    assert ran.returncode == 0 and ran.stdout == "in-42\n", ran.stderr
    # a ServiceAccount token (kubectl create token) bound to edit does the same
    env.kubectl("create", "serviceaccount", "ci", "-n", NS)
    env.kubectl("create", "rolebinding", "ci-edit", "--clusterrole=edit", "--serviceaccount=rbac-pods:ci", "-n", NS)
    token = env.kubectl("create", "token", "ci", "-n", NS).stdout.strip()
    ran = subprocess.run(["kubectl", "--token", token, "exec", "talker", "-n", NS, "--", "echo", "sa-ok"],
                         capture_output=True, text=True, timeout=90, check=False,
                         env={**os.environ, "KUBECONFIG": str(env.cluster.kubeconfig)})
    assert ran.returncode == 0 and ran.stdout == "sa-ok\n", ran.stderr
    other = subprocess.run(["kubectl", "--token", token, "logs", "talker", "-n", "default"], capture_output=True,
                           text=True, timeout=90, check=False,
                           env={**os.environ, "KUBECONFIG": str(env.cluster.kubeconfig)})
    assert other.returncode != 0 and 'User "system:serviceaccount:rbac-pods:ci" cannot get resource "pods"' \
        in other.stderr


def _token(kubeconfig: Path) -> str:
    return str(yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"])


async def _console(env: PodEnv, token: str, ns: str, name: str) -> int | bytes:  # noqa: F811
    """The serial console as the web console opens it; the status code of a refused upgrade, or what the guest
    printed after a newline was sent."""
    proto = "base64url.bearer.authorization.k8s.io." + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")
    url = (f"{env.cluster.server}/apis/subresources.kubevirt.io/v1/namespaces/{ns}/virtualmachineinstances/"
           f"{name}/console")
    async with aiohttp.ClientSession() as s:
        try:
            async with s.ws_connect(url, protocols=["plain.kubevirt.io", proto], ssl=env.cluster.ssl_context()) as ws:
                await ws.send_bytes(b"\r")
                got = b""
                async with asyncio.timeout(60):
                    while b"login" not in got:
                        msg = await ws.receive()
                        if msg.type not in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                            break
                        got += msg.data if isinstance(msg.data, bytes) else msg.data.encode()
                return got
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


def test_vm_console_vnc_and_stop_for_editors_only(env: PodEnv, tmp_path: Path) -> None:  # noqa: F811
    ns = "rbac-vms"
    guest.push_oci_layout(env.registry.host, guest.image_paths().containerdisk_oci, "virtplane/tiny")
    image = f"{env.registry.host}/virtplane/tiny:latest"
    env.kubectl("create", "namespace", ns)
    env.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "guarded"},
        "spec": {"runStrategy": "Always", "template": {"spec": {
            "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
                       "resources": {"requests": {"memory": "128Mi"}}},
            "volumes": [{"name": "root", "containerDisk": {"image": image}}]}}}}))
    viewer, editor = add_user(env, "vic"), add_user(env, "eddie")
    env.kubectl("create", "rolebinding", "vic-view", "--clusterrole=view", "--user=vic", "-n", ns)
    env.kubectl("create", "rolebinding", "eddie-edit", "--clusterrole=edit", "--user=eddie", "-n", ns)

    def phase() -> str:
        got = as_user(viewer, "get", "vmi", "guarded", "-n", ns, "-o", "jsonpath={.status.phase}")
        return got.stdout if got.returncode == 0 else ""

    try:
        wait_for(lambda: phase() == "Running", 240, what="VMI guarded Running (as seen by the viewer)")
    except AssertionError as exc:
        vm = env.kubectl("get", "vm,vmi,pods", "-n", ns, "-o", "yaml", check=False).stdout
        raise AssertionError(f"{exc}\n{vm[-4000:]}\nagent log:\n{env.agent_log()[-3000:]}") from None
    shot = tmp_path / "shot.png"
    refused = virtctl(viewer, "vnc", "screenshot", "guarded", "-n", ns, "-f", str(shot))
    assert refused.returncode != 0 and "virtualmachineinstances/vnc" in refused.stderr + refused.stdout
    assert asyncio.run(_console(env, _token(viewer), ns, "guarded")) == 403
    refused = virtctl(viewer, "stop", "guarded", "-n", ns)
    assert refused.returncode != 0 and "virtualmachines/stop" in refused.stderr + refused.stdout
    taken = virtctl(editor, "vnc", "screenshot", "guarded", "-n", ns, "-f", str(shot))
    assert taken.returncode == 0, taken.stderr
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = asyncio.run(_console(env, _token(editor), ns, "guarded"))
    assert isinstance(out, bytes) and b"login" in out, out
    stopped = virtctl(editor, "stop", "guarded", "-n", ns)
    assert stopped.returncode == 0, stopped.stderr
    wait_for(lambda: env.kubectl("get", "vmi", "guarded", "-n", ns, check=False).returncode != 0, 180,
             what="VMI guarded gone after the editor's stop")
    env.kubectl("delete", "namespace", ns, "--wait=false")
