"""Multus-style secondary networks with KubeVirt's bridge binding on a CNI node: a NetworkAttachmentDefinition
whose config is a real bridge + host-local chain; two VMs with a second NIC on it get their NAD addresses by
DHCP and reach each other over it; a third NIC is hotplugged into one and unplugged again. A broken NAD fails
the VMI clearly and leaves nothing behind."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.network.test_pod_network import delete_and_wait, leftovers, netns_list, netns_of
from tests.e2e.node.conftest import VMIS, wait_until
from tests.e2e.node.test_node_agent import NS, _ready_node, schedule, vmi_body, wait_file
from virtplane.client import rest

NADS = rest.GVR("k8s.cni.cncf.io", "v1", "network-attachment-definitions")
SUBNET = "192.168.177.0/24"

GUEST_SCRIPT = """#!/bin/sh
ip route | grep -q '^default' || ip route add default via 10.0.2.1
i=0
while [ $i -lt 60 ] && ! ip -4 addr show eth1 | grep -q inet; do i=$((i+1)); sleep 1; done
me=$(ip -4 addr show eth1 | sed -n 's/.*inet \\([0-9.]*\\/[0-9]*\\).*/\\1/p')
echo "E2E-ETH1 $me" > /dev/console
i=0
while [ $i -lt 90 ]; do
  i=$((i+1))
  for p in 192.168.177.2 192.168.177.3 192.168.177.4; do
    [ "$p/24" = "$me" ] && continue
    if ping -c 1 -W 1 $p >/dev/null 2>&1; then echo "E2E-PEER $p" > /dev/console; exit 0; fi
  done
done
echo "E2E-PEER none" > /dev/console
"""


@pytest.fixture
def bridge() -> Iterator[str]:
    name = f"vpnad{secrets.token_hex(3)}"  # host-global: unique per run, removed after
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "delete", name], check=False, capture_output=True)


def nad(name: str, config: Any) -> dict[str, Any]:
    return {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"config": config if isinstance(config, str) else json.dumps(config)}}  # fmt: skip


def with_secondary(body: dict[str, Any], network: str) -> dict[str, Any]:
    body["spec"]["domain"]["devices"]["interfaces"].append({"name": "sec", "bridge": {}})
    body["spec"]["networks"].append({"name": "sec", "multus": {"networkName": network}})
    return body


async def test_two_vms_on_a_bridge_nad(env: dict[str, Any], admin: rest.Client, component: rest.Client,
                                       bridge: str) -> None:  # fmt: skip
    await wait_until(lambda: _ready_node(admin), 60, "node Ready")
    config = {"cniVersion": "1.0.0", "name": "sec-net", "plugins": [{
        "type": "bridge", "bridge": bridge, "isGateway": False, "ipMasq": False,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET}]], "dataDir": str(env["root"] / "ipam")}}]}
    await admin.create(NADS, nad("sec", config), NS)
    await admin.create(NADS, nad("broken", "{not json"), NS)

    # A NAD whose config is not a CNI config: the VMI fails saying which network, and no netns is left.
    await admin.create(VMIS, with_secondary(vmi_body("badsec", env["image"]), "broken"), NS)
    await schedule(admin, component, "badsec")

    async def failed() -> dict[str, Any] | None:
        vmi = await admin.get(VMIS, "badsec", NS)
        return vmi if (vmi.get("status") or {}).get("phase") == "Failed" else None

    vmi = await wait_until(failed, 90, "badsec Failed")
    ready = next(c for c in vmi["status"]["conditions"] if c["type"] == "Ready")
    assert "network 'sec' (NetworkAttachmentDefinition default/broken): CNI config is not JSON" in ready["message"]
    assert netns_of(vmi["metadata"]["uid"]) not in netns_list()
    assert not leftovers(env["root"], vmi["metadata"]["uid"])
    await delete_and_wait(admin, "badsec")

    for name in ("seca", "secb"):
        await admin.create(VMIS, with_secondary(vmi_body(name, env["image"], user_data=GUEST_SCRIPT), "sec"), NS)
        await schedule(admin, component, name)
    runtime = env["root"] / "node" / "runtime"
    addrs = {}
    for name in ("seca", "secb"):
        m = await wait_file(runtime / f"{NS}_{name}" / "console.log", r"E2E-ETH1 (\S*)", 300)
        addrs[name] = m.group(1)
    assert {a.rsplit(".", 1)[0] for a in addrs.values()} == {"192.168.177"}, addrs  # DHCP: the NAD's IPAM
    assert len(set(addrs.values())) == 2

    async def reported(name: str) -> str | None:  # status.interfaces: the NAD address for the bridge NIC
        vmi = await admin.get(VMIS, name, NS)
        sec = next((i for i in (vmi.get("status") or {}).get("interfaces") or [] if i["name"] == "sec"), {})
        return sec.get("ipAddress")

    for name in ("seca", "secb"):
        assert await wait_until(lambda n=name: reported(n), 30, f"{name} sec ip") == addrs[name].split("/")[0]
    for name in ("seca", "secb"):
        m = await wait_file(runtime / f"{NS}_{name}" / "console.log", r"E2E-PEER (\S+)", 200)
        other = next(a for n, a in addrs.items() if n != name)
        assert m.group(1) == other.split("/")[0], (name, m.group(0), addrs)  # over the NAD's bridge

    # The guests got the NAD's addresses; host-local holds them until the VMIs go.
    ipam = env["root"] / "ipam" / "sec-net"
    held = sorted(p.name for p in ipam.iterdir() if re.match(r"\d+\.\d+\.\d+\.\d+$", p.name))
    assert held == sorted(a.split("/")[0] for a in addrs.values())

    await hotplug_and_unplug(env, component, runtime / f"{NS}_seca" / "console.log", ipam)
    for name in ("seca", "secb"):
        await delete_and_wait(admin, name)
    assert not [p for p in ipam.iterdir() if re.match(r"\d+\.\d+\.\d+\.\d+$", p.name)]  # released by CNI DEL


async def hotplug_and_unplug(env: dict[str, Any], component: rest.Client, console: Any, ipam: Any) -> None:
    """KubeVirt 1.x's declarative NIC hotplug on the running seca: an interface + multus network added to the
    VMI's spec becomes a virtio NIC the guest announces and configures by DHCP; `state: absent` unplugs it
    and releases its address."""

    async def edit(change: Any) -> None:
        for _ in range(10):
            vmi = await component.get(VMIS, "seca", NS)
            change(vmi["spec"])
            try:
                await component.update(VMIS, vmi)
                return
            except rest.Conflict:
                continue
        raise AssertionError("could not update the VMI")

    def add(spec: dict[str, Any]) -> None:
        spec["domain"]["devices"]["interfaces"].append({"name": "hot", "bridge": {}})
        spec["networks"].append({"name": "hot", "multus": {"networkName": f"{NS}/sec"}})

    await edit(add)
    await wait_file(console, r"virtplane-guest: nic eth2 added", 120)
    m = await wait_file(console, r"virtplane-guest: ip eth2 (192\.168\.177\.\d+)", 120)
    assert (ipam / m.group(1)).exists()

    def absent(spec: dict[str, Any]) -> None:
        next(i for i in spec["domain"]["devices"]["interfaces"] if i["name"] == "hot")["state"] = "absent"

    await edit(absent)
    await wait_file(console, r"virtplane-guest: nic eth2 removed", 120)

    async def released() -> bool:
        return not (ipam / m.group(1)).exists()

    await wait_until(released, 60, "the hotplugged NIC's address released after unplug")



VMS = rest.GVR("kubevirt.io", "v1", "virtualmachines")


async def test_vm_nic_hotplug_with_virtctl_and_restart_required(env: dict[str, Any], admin: rest.Client,
                                                                bridge: str) -> None:  # fmt: skip
    """Declarative NIC hotplug on a VirtualMachine: `virtctl addinterface` adds a bridge NIC on a NAD to the
    VM's template, the VM controller carries it into the running VMI and the guest announces it and takes a
    NAD address by DHCP, with no RestartRequired; `virtctl removeinterface` unplugs it. A change the running
    VM cannot take (the pod NIC's model) shows RestartRequired."""
    from tests.e2e.network.test_services import virtctl

    await wait_until(lambda: _ready_node(admin), 60, "node Ready")
    subnet = "192.168.178"
    config = {"cniVersion": "1.0.0", "name": "hot-net", "plugins": [{
        "type": "bridge", "bridge": bridge, "isGateway": False, "ipMasq": False,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": f"{subnet}.0/24"}]],
                 "dataDir": str(env["root"] / "ipam")}}]}
    await admin.create(NADS, nad("hotnet", config), NS)
    template = vmi_body("hotvm", env["image"])
    vm = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "hotvm", "namespace": NS},
          "spec": {"runStrategy": "Always", "template": {"metadata": {"labels": {"app": "hotvm"}},
                                                        "spec": template["spec"]}}}  # fmt: skip
    await admin.create(VMS, vm, NS)
    console = env["root"] / "node" / "runtime" / f"{NS}_hotvm" / "console.log"
    await wait_file(console, r"virtplane-e2e user-data ran", 300)
    kubeconfig = str(env["cluster"].kubeconfig)

    async def conditions() -> dict[str, str]:
        got = await admin.get(VMS, "hotvm", NS)
        return {c["type"]: c["status"] for c in (got.get("status") or {}).get("conditions") or []}

    try:
        out = await virtctl(kubeconfig, "-n", NS, "addinterface", "hotvm",
                            "--network-attachment-definition-name", "hotnet", "--name", "hot")
        assert out.returncode == 0, out.stderr
        assert "Successfully submitted add interface request to VM hotvm for interface hot" in out.stdout
        await wait_file(console, r"virtplane-guest: nic eth1 added", 120)
        m = await wait_file(console, rf"virtplane-guest: ip eth1 ({subnet}\.\d+)", 120)

        async def reported() -> str | None:
            vmi = await admin.get(VMIS, "hotvm", NS)
            hot = next((i for i in (vmi.get("status") or {}).get("interfaces") or [] if i["name"] == "hot"), {})
            return hot.get("ipAddress")

        assert await wait_until(reported, 60, "hot NIC in status.interfaces") == m.group(1)
        assert (await conditions()).get("RestartRequired") != "True"
        # adding it again is refused with the reason, and nothing changes
        again = await virtctl(kubeconfig, "-n", NS, "addinterface", "hotvm",
                              "--network-attachment-definition-name", "hotnet", "--name", "hot")
        assert again.returncode != 0 and "already exists" in again.stderr, (again.stdout, again.stderr)

        out = await virtctl(kubeconfig, "-n", NS, "removeinterface", "hotvm", "--name", "hot")
        assert out.returncode == 0, out.stderr
        await wait_file(console, r"virtplane-guest: nic eth1 removed", 120)
        vmi = await admin.get(VMIS, "hotvm", NS)
        hot = next(i for i in vmi["spec"]["domain"]["devices"]["interfaces"] if i["name"] == "hot")
        assert hot.get("state") == "absent"
        assert (await conditions()).get("RestartRequired") != "True"

        # the pod NIC's model cannot change live
        got = await admin.get(VMS, "hotvm", NS)
        got["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"][0]["model"] = "e1000e"
        await admin.update(VMS, got)

        async def restart_required() -> bool:
            return (await conditions()).get("RestartRequired") == "True"

        await wait_until(restart_required, 60, "RestartRequired after a pod NIC model change")
    finally:
        await admin.delete(VMS, "hotvm", NS)

        async def gone() -> bool:
            try:
                await admin.get(VMIS, "hotvm", NS)
                return False
            except rest.NotFound:
                return True

        await wait_until(gone, 90, "hotvm's VMI gone")
