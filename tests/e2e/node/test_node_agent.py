"""The node agent against a real cluster, a real registry and real QEMU (TCG) with virtplane's tiny guest.

When the cluster's controllers (VMI controller + scheduler) are present they schedule the VMI onto our node;
otherwise this test plays their part with the components token (finalizer, launcher pod, status.nodeName,
label kubevirt.io/nodeName, phase Scheduled) — users may not write those.
"""

from __future__ import annotations

import asyncio
import copy
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.node.conftest import (
    EVENTS,
    LEASES,
    NODE,
    NODES,
    PODS,
    SECRETS,
    VMIS,
    alive,
    proxy_token,
    read,
    ticks,
    wait_until,
)
from virtplane.client import rest

pytestmark = pytest.mark.e2e

NS = "default"
USER_DATA = """#cloud-config
bootcmd:
  - echo "virtplane-e2e user-data ran for $(hostname)" > /dev/console
"""
POWEROFF = """#cloud-config
bootcmd:
  - sync; poweroff -f
"""


def vmi_body(name: str, image: str, grace: int = 20, user_data: str = USER_DATA) -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "terminationGracePeriodSeconds": grace,
            "domain": {
                "resources": {"requests": {"memory": "256Mi"}},
                "devices": {
                    "disks": [{"name": "containerdisk", "disk": {"bus": "virtio"}},
                              {"name": "cloudinitdisk", "disk": {"bus": "virtio"}}],
                    "interfaces": [{"name": "default", "masquerade": {}}],
                    "rng": {},
                },
            },
            "networks": [{"name": "default", "pod": {}}],
            "volumes": [{"name": "containerdisk", "containerDisk": {"image": image}},
                        {"name": "cloudinitdisk", "cloudInitNoCloud": {"userData": user_data}}],
        },
    }  # fmt: skip


async def schedule(admin: rest.Client, component: rest.Client, name: str, controllers_seen: float = 6.0) -> str:
    """Wait for the cluster's controllers to schedule the VMI to our node; do it by hand if nobody does."""
    deadline = time.monotonic() + controllers_seen
    while time.monotonic() < deadline:
        vmi = await admin.get(VMIS, name, NS)
        if (vmi.get("status") or {}).get("phase"):
            return "controllers"  # a VMI controller is at work: let it (and the scheduler) finish
        await asyncio.sleep(0.2)
    vmi = await component.get(VMIS, name, NS)
    uid = vmi["metadata"]["uid"]
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"virt-launcher-{name}-e2e00", "namespace": NS,
                     "labels": {"kubevirt.io": "virt-launcher", "kubevirt.io/created-by": uid,
                                "vm.kubevirt.io/name": name},
                     "annotations": {"kubevirt.io/domain": name},
                     "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                                          "name": name, "uid": uid, "controller": True,
                                          "blockOwnerDeletion": True}]},
        "spec": {"nodeName": NODE, "containers": [{"name": "compute", "image": "virtplane/virt-launcher",
                                                    "resources": {"requests": {"memory": "496Mi"}}}]},
    }  # fmt: skip
    await component.create(PODS, pod, NS)
    vmi["metadata"].setdefault("labels", {})["kubevirt.io/nodeName"] = NODE
    vmi["status"] = {"phase": "Scheduled", "nodeName": NODE}
    with_finalizer = copy.deepcopy(vmi)
    with_finalizer["metadata"].setdefault("finalizers", []).append("foregroundDeleteVirtualMachine")
    try:
        await component.update(VMIS, with_finalizer)
        return "by hand"
    except rest.APIError as err:
        if err.code != 422 or "finalizers" not in str(err):
            raise
    # The API server currently rejects KubeVirt's unqualified finalizer name (real Kubernetes only warns for
    # custom resources). Go on without it: deletion is then immediate and the agent tears QEMU down.
    await component.update(VMIS, vmi)
    return "by hand, no finalizer (API server rejects it)"


async def agent_call(env: dict[str, Any], admin: rest.Client, method: str, path: str) -> tuple[int, Any]:
    node = await admin.get(NODES, NODE)
    port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
    fp = bytes.fromhex(node["metadata"]["annotations"]["virtplane.io/agent-cert-sha256"])
    token = proxy_token(await admin.get(SECRETS, "virtplane-node-proxy", "kube-system"))
    async with aiohttp.ClientSession() as http, http.request(
        method, f"https://127.0.0.1:{port}{path}", ssl=aiohttp.Fingerprint(fp),
        headers={"Authorization": f"Bearer {token}"},
    ) as resp:
        body = await resp.read()
        ctype = resp.headers.get("Content-Type", "")
        return resp.status, (await resp.json() if body and "json" in ctype else body.decode())


def vmi_path(name: str, action: str) -> str:
    return f"/v1/namespaces/{NS}/virtualmachineinstances/{name}/{action}"


def cond(vmi: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in (vmi.get("status") or {}).get("conditions") or [] if c.get("type") == ctype), None)


async def wait_file(path: Path, pattern: str, timeout: float) -> re.Match[str]:  # noqa: ASYNC109
    rx = re.compile(pattern)

    async def probe() -> re.Match[str] | None:
        try:
            return rx.search(read(path))
        except FileNotFoundError:
            return None

    return await wait_until(probe, timeout, f"{pattern!r} in {path}")


async def test_node_registration_and_lease(env: dict[str, Any], admin: rest.Client) -> None:
    node = await wait_until(lambda: _ready_node(admin), 60, "node Ready")
    meta, status = node["metadata"], node["status"]
    assert meta["labels"]["kubevirt.io/schedulable"] == "true"
    assert meta["labels"]["kubernetes.io/hostname"] == NODE
    assert "devices.kubevirt.io/kvm" not in status["capacity"]  # TCG here: the probe guest cannot run on KVM
    assert meta["annotations"]["virtplane.io/accel"] == "tcg"
    assert meta["annotations"]["virtplane.io/accel-reason"]
    assert len(meta["annotations"]["virtplane.io/agent-cert-sha256"]) == 64
    assert status["capacity"]["pods"] == "110" and int(status["capacity"]["cpu"]) >= 1
    assert status["nodeInfo"]["kubeletVersion"] == "v1.32.0-virtplane"
    assert status["nodeInfo"]["architecture"] == "amd64"
    assert {"type": "InternalIP", "address": "127.0.0.1"} in status["addresses"]
    assert status["daemonEndpoints"]["kubeletEndpoint"]["Port"] > 0
    lease = await wait_until(lambda: _get_or_none(admin, LEASES, NODE, "kube-node-lease"), 20, "lease")
    assert lease["spec"]["holderIdentity"] == NODE
    first = lease["spec"]["renewTime"]

    async def renewed() -> bool:
        return (await admin.get(LEASES, NODE, "kube-node-lease"))["spec"]["renewTime"] != first

    await wait_until(renewed, 15, "lease renewal")
    # the agent API refuses callers without the proxy token
    port = status["daemonEndpoints"]["kubeletEndpoint"]["Port"]
    fp = bytes.fromhex(meta["annotations"]["virtplane.io/agent-cert-sha256"])
    async with aiohttp.ClientSession() as http, http.put(
        f"https://127.0.0.1:{port}{vmi_path('nope', 'pause')}", ssl=aiohttp.Fingerprint(fp)
    ) as resp:
        assert resp.status == 401
        assert (await resp.json())["kind"] == "Status"
    code, body = await agent_call(env, admin, "PUT", vmi_path("nope", "pause"))
    assert code == 404 and body["reason"] == "NotFound"


async def _ready_node(admin: rest.Client) -> dict[str, Any] | None:
    node = await _get_or_none(admin, NODES, NODE)
    if node and any(c["type"] == "Ready" and c["status"] == "True" for c in (node.get("status") or {})
                    .get("conditions") or []):  # fmt: skip
        return node
    return None


async def _get_or_none(client: rest.Client, gvr: rest.GVR, name: str, ns: str | None = None) -> Any:
    try:
        return await client.get(gvr, name, ns)
    except rest.NotFound:
        return None


async def test_vmi_lifecycle(env: dict[str, Any], admin: rest.Client, component: rest.Client) -> None:
    t: dict[str, float] = {}
    await wait_until(lambda: _ready_node(admin), 60, "node Ready")
    runtime = env["root"] / "node" / "runtime" / f"{NS}_vm1"
    console, guest_log = runtime / "console.log", runtime / "guest.log"

    start = time.monotonic()
    await admin.create(VMIS, vmi_body("vm1", env["image"]), NS)
    how = await schedule(admin, component, "vm1")

    async def running() -> dict[str, Any] | None:
        vmi = await admin.get(VMIS, "vm1", NS)
        phase = (vmi.get("status") or {}).get("phase")
        assert phase not in ("Failed", "Succeeded"), (vmi.get("status"), env["agent"].log_tail())
        return vmi if phase == "Running" else None

    vmi = await wait_until(running, 120, "vm1 Running")
    t["create->Running"] = time.monotonic() - start
    await wait_file(console, r"virtplane-guest: booted", 120)
    t["create->booted"] = time.monotonic() - start
    m = await wait_file(console, r"virtplane-e2e user-data ran for (\S+)", 120)
    assert m.group(1) == "vm1"  # cloud-init NoCloud applied: meta-data hostname and user-data bootcmd
    t["create->cloud-init"] = time.monotonic() - start

    status = vmi["status"]
    assert status["nodeName"] == NODE
    assert status["interfaces"][0]["ipAddress"] == "10.0.2.2"
    assert status["interfaces"][0]["mac"].startswith("52:54:00:")
    assert cond(vmi, "Ready")["status"] == "True"
    se = cond(vmi, "SoftwareEmulation")
    assert se is not None and se["status"] == "True"
    assert {v["name"]: v["target"] for v in status["volumeStatus"]} == {"containerdisk": "vda", "cloudinitdisk": "vdb"}
    assert status["machine"]["type"] == "q35"
    assert [p["phase"] for p in status["phaseTransitionTimestamps"]][-1] == "Running"
    pods = (await admin.list(PODS, NS, labelSelector=f"kubevirt.io/created-by={vmi['metadata']['uid']}"))["items"]
    assert pods, "no launcher pod"
    try:
        pod = await wait_until(lambda: _pod_running(admin, pods[0]["metadata"]["name"]), 30, "launcher pod Running")
    except TimeoutError as err:
        raise AssertionError(f"{err}: {await admin.get(PODS, pods[0]['metadata']['name'], NS)}") from err
    pstatus = pod["status"]
    assert pstatus["hostIP"] == "127.0.0.1" and pstatus["podIP"] == "127.0.0.1"
    assert pstatus["containerStatuses"][0]["name"] == "compute"
    assert "running" in pstatus["containerStatuses"][0]["state"]
    assert {c["type"] for c in pstatus["conditions"]} >= {"Ready", "ContainersReady", "Initialized", "PodScheduled"}

    # the guest agent: AgentConnected, guestOSInfo, the guest's interface name
    async def agent_connected() -> dict[str, Any] | None:
        v = await admin.get(VMIS, "vm1", NS)
        c = cond(v, "AgentConnected")
        return v if c and c["status"] == "True" and v["status"].get("guestOSInfo") else None

    vmi = await wait_until(agent_connected, 90, "AgentConnected")
    t["create->AgentConnected"] = time.monotonic() - start
    assert vmi["status"]["guestOSInfo"]["kernelRelease"].startswith("6.")
    iface = vmi["status"]["interfaces"][0]
    assert iface["infoSource"] == "domain, guest-agent" and iface["interfaceName"] == "eth0"
    assert "10.0.2.2" in iface["ipAddresses"]
    code, info = await agent_call(env, admin, "GET", vmi_path("vm1", "guestosinfo"))
    assert code == 200, info
    assert info["kind"] == "VirtualMachineInstanceGuestAgentInfo" and info["os"]["kernelRelease"].startswith("6.")
    code, users = await agent_call(env, admin, "GET", vmi_path("vm1", "userlist"))
    assert code == 200 and users["kind"] == "VirtualMachineInstanceGuestOSUserList", users
    code, fs = await agent_call(env, admin, "GET", vmi_path("vm1", "filesystemlist"))
    assert code == 200 and fs["kind"] == "VirtualMachineInstanceFileSystemList", fs

    # pause / unpause through the agent API: the heartbeat stops, then continues where it was
    await wait_until(lambda: _async(len(ticks(guest_log)) > 0), 60, "guest ticks")
    code, body = await agent_call(env, admin, "PUT", vmi_path("vm1", "pause"))
    assert code == 200, body
    paused_at = len(ticks(guest_log))
    last = ticks(guest_log)[-1][0]

    async def paused() -> dict[str, Any] | None:
        v = await admin.get(VMIS, "vm1", NS)
        c = cond(v, "Paused")
        return v if c and c["status"] == "True" else None

    vmi = await wait_until(paused, 10, "Paused condition")
    assert cond(vmi, "Paused")["reason"] == "PausedByUser"
    assert cond(vmi, "Ready")["status"] == "False"
    code, body = await agent_call(env, admin, "PUT", vmi_path("vm1", "pause"))
    assert code == 409, body
    await asyncio.sleep(2.5)  # a negative check needs time: no tick while paused
    assert len(ticks(guest_log)) == paused_at
    code, body = await agent_call(env, admin, "PUT", vmi_path("vm1", "unpause"))
    assert code == 200, body
    await wait_until(lambda: _async(len(ticks(guest_log)) > paused_at), 10, "tick after unpause")
    assert ticks(guest_log)[paused_at][0] == last + 1

    async def unpaused() -> bool:
        v = await admin.get(VMIS, "vm1", NS)
        return cond(v, "Paused") is None and cond(v, "Ready")["status"] == "True"

    await wait_until(unpaused, 10, "Paused condition removed")

    # the same through the API server's subresource, which proxies to this agent (pinned certificate, token)
    sub = f"/apis/subresources.kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances/vm1"
    await admin.request("PUT", f"{sub}/pause")
    await wait_until(paused, 10, "Paused via the API server")
    await admin.request("PUT", f"{sub}/unpause")
    await wait_until(unpaused, 10, "unpaused via the API server")
    info = await admin.request("GET", f"{sub}/guestosinfo")
    assert info["os"]["id"], info
    # the console routes (virtplane.console) mounted on this agent, reached through the API server
    async with admin.session.get(f"{sub}/vnc/screenshot") as resp:
        assert resp.status == 200 and (await resp.read()).startswith(b"\x89PNG"), resp.status
    async with admin.session.get(f"{sub}/consolelog", params={"tail": "200"}) as resp:
        assert resp.status == 200 and "virtplane-guest: booted" in await resp.text(), resp.status

    # metrics
    code, text = await agent_call(env, admin, "GET", "/metrics")
    assert code == 200
    resident = rf'kubevirt_vmi_memory_resident_bytes\{{name="vm1",namespace="default",node="{NODE}"\}} \d+'
    assert re.search(resident, text), text[:2000]
    assert 'kubevirt_vmi_storage_read_traffic_bytes_total{name="vm1"' in text
    assert 'kubevirt_vmi_vcpu_seconds_total{name="vm1"' in text

    # kill -9 the node agent and start it again: the same QEMU keeps running, the guest never reboots
    qemu_pid = int((runtime / "pid").read_text())
    before = ticks(guest_log)[-1]
    env["agent"].kill()
    await asyncio.sleep(1.0)
    assert alive(qemu_pid)
    t0 = time.monotonic()
    env["agent"].start()
    await wait_until(lambda: _agent_serves(env, admin), 60, "agent back")
    t["agent restart->serving"] = time.monotonic() - t0
    code, body = await agent_call(env, admin, "PUT", vmi_path("vm1", "pause"))  # the adopted machine obeys
    assert code == 200, body
    code, body = await agent_call(env, admin, "PUT", vmi_path("vm1", "unpause"))
    assert code == 200, body
    await wait_until(lambda: _async(ticks(guest_log)[-1][0] > before[0] + 1), 20, "ticks after restart")
    after = ticks(guest_log)[-1]
    assert after[0] > before[0] and after[1] > before[1]  # counter and uptime only grew: no reboot
    assert int((runtime / "pid").read_text()) == qemu_pid and alive(qemu_pid)
    assert console.read_text(errors="replace").count("virtplane-guest: booted") == 1
    assert (await admin.get(VMIS, "vm1", NS))["status"]["phase"] == "Running"

    # the agent down, QEMU killed meanwhile, the agent back: the VMI fails with that reason
    env["agent"].kill()
    os.kill(qemu_pid, signal.SIGKILL)
    await wait_until(lambda: _async(not alive(qemu_pid)), 10, "QEMU gone")
    env["agent"].start()
    vmi = await wait_until(lambda: _phase_obj(admin, "vm1", "Failed"), 60, "vm1 Failed")
    message = cond(vmi, "Ready")["message"]
    assert "while the node agent was down" in message and str(qemu_pid) in message, message
    events = (await admin.list(EVENTS, NS))["items"]
    mine = [e for e in events if e["involvedObject"].get("name") == "vm1"]
    reasons = {(e["reason"], e["type"]) for e in mine}
    assert {("Created", "Normal"), ("Started", "Normal"), ("Stopped", "Warning")} <= reasons, reasons
    assert all(e["source"]["component"] == "virt-handler" for e in mine if e["reason"] in ("Created", "Started"))
    pod = await wait_until(lambda: _pod_phase(admin, pods[0]["metadata"]["name"], "Failed"), 20, "pod Failed")
    assert "terminated" in pod["status"]["containerStatuses"][0]["state"]

    # delete the failed VMI: runtime dir removed, finalizer removed, object gone
    await admin.delete(VMIS, "vm1", NS)
    await wait_until(lambda: _gone(admin, "vm1"), 30, "vm1 gone")
    await wait_until(lambda: _async(not runtime.exists()), 30, "vm1's runtime dir removed")

    # a second VMI (image cached now), started by this agent: kill QEMU while it watches → Failed, SIGKILL
    start = time.monotonic()
    await admin.create(VMIS, vmi_body("vm2", env["image"]), NS)
    await schedule(admin, component, "vm2")
    runtime2 = env["root"] / "node" / "runtime" / f"{NS}_vm2"
    await wait_until(lambda: _phase(admin, "vm2", "Running"), 120, "vm2 Running")
    t["vm2 create->Running (cached image)"] = time.monotonic() - start
    await wait_file(runtime2 / "console.log", r"virtplane-guest: booted", 120)
    t["vm2 create->booted (cached image)"] = time.monotonic() - start
    os.kill(int((runtime2 / "pid").read_text()), signal.SIGKILL)
    vmi = await wait_until(lambda: _phase_obj(admin, "vm2", "Failed"), 30, "vm2 Failed")
    assert "SIGKILL" in cond(vmi, "Ready")["message"], cond(vmi, "Ready")
    await admin.delete(VMIS, "vm2", NS)
    await wait_until(lambda: _gone(admin, "vm2"), 30, "vm2 gone")

    # a guest that powers itself off: QMP SHUTDOWN → Succeeded, Normal event Stopped
    await admin.create(VMIS, vmi_body("vm4", env["image"], user_data=POWEROFF), NS)
    await schedule(admin, component, "vm4")
    vmi = await wait_until(lambda: _phase_obj(admin, "vm4", "Succeeded"), 120, "vm4 Succeeded")
    assert cond(vmi, "Ready")["status"] == "False"
    events = (await admin.list(EVENTS, NS))["items"]
    assert any(e["reason"] == "Stopped" and e["type"] == "Normal" and e["involvedObject"].get("name") == "vm4"
               for e in events)  # fmt: skip
    await admin.delete(VMIS, "vm4", NS)
    await wait_until(lambda: _gone(admin, "vm4"), 30, "vm4 gone")

    # a third: graceful deletion via the ACPI power button within terminationGracePeriodSeconds
    await admin.create(VMIS, vmi_body("vm3", env["image"], grace=60), NS)
    how3 = await schedule(admin, component, "vm3")
    runtime3 = env["root"] / "node" / "runtime" / f"{NS}_vm3"
    await wait_until(lambda: _phase(admin, "vm3", "Running"), 120, "vm3 Running")
    await wait_file(runtime3 / "console.log", r"virtplane-guest: ready", 120)  # acpid is up
    pid3 = int((runtime3 / "pid").read_text())
    t0 = time.monotonic()
    await admin.delete(VMIS, "vm3", NS)
    if "no finalizer" not in how3:
        # the guest hears the power button and shuts down (seen before the runtime dir is removed)
        await wait_file(runtime3 / "console.log", r"virtplane-guest: acpi power button", 30)
    await wait_until(lambda: _gone(admin, "vm3"), 90, "vm3 gone")
    t["vm3 delete->gone"] = time.monotonic() - t0
    if "no finalizer" not in how3:
        assert t["vm3 delete->gone"] < 55, "the guest should have powered off before the grace period"
        events = (await admin.list(EVENTS, NS))["items"]
        assert any(e["reason"] == "ShuttingDown" and e["involvedObject"].get("name") == "vm3" for e in events)
    await wait_until(lambda: _async(not alive(pid3)), 30, "vm3's QEMU gone")
    await wait_until(lambda: _async(not runtime3.exists()), 30, "vm3's runtime dir removed")
    print(f"\nnode e2e ({how}):", ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))


async def _async(value: bool) -> bool:
    return value


async def _phase(admin: rest.Client, name: str, phase: str) -> bool:
    vmi = await admin.get(VMIS, name, NS)
    return (vmi.get("status") or {}).get("phase") == phase


async def _phase_obj(admin: rest.Client, name: str, phase: str) -> dict[str, Any] | None:
    vmi = await admin.get(VMIS, name, NS)
    return vmi if (vmi.get("status") or {}).get("phase") == phase else None


async def _pod_phase(admin: rest.Client, name: str, phase: str) -> dict[str, Any] | None:
    pod = await admin.get(PODS, name, NS)
    return pod if (pod.get("status") or {}).get("phase") == phase else None


async def _gone(admin: rest.Client, name: str) -> bool:
    return await _get_or_none(admin, VMIS, name, NS) is None


async def _pod_running(admin: rest.Client, name: str) -> dict[str, Any] | None:
    pod = await admin.get(PODS, name, NS)
    return pod if (pod.get("status") or {}).get("phase") == "Running" else None


async def _agent_serves(env: dict[str, Any], admin: rest.Client) -> bool:
    try:
        code, _ = await agent_call(env, admin, "GET", "/healthz")
    except (aiohttp.ClientError, OSError):
        return False
    return code == 200
