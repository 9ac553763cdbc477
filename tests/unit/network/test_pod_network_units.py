"""The pure parts of the pod network: CNI config parsing, ADD results, the masquerade NAT rules, and how the
node maps a VMI's interfaces to attachments with and without `--pod-network cni`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from virtplane.network import cni, pod
from virtplane.node import network


def test_single_config_becomes_a_chain() -> None:
    conf = cni.parse_config(json.dumps({"cniVersion": "0.4.0", "name": "n", "type": "bridge"}))
    assert conf["name"] == "n" and [p["type"] for p in conf["plugins"]] == ["bridge"]
    assert conf["cniVersion"] == "0.4.0"


@pytest.mark.parametrize(("raw", "needle"), [
    ("{not json", "not JSON"),
    ("[]", "JSON object"),
    (json.dumps({"name": "n"}), "neither"),
    (json.dumps({"name": "n", "plugins": []}), "no plugins"),
    (json.dumps({"plugins": [{"type": "bridge"}]}), "no `name`"),
    (json.dumps({"name": "n", "plugins": [{"type": "../../bin/sh"}]}), "plain name"),
])  # fmt: skip
def test_bad_configs_are_refused_with_a_reason(raw: str, needle: str) -> None:
    with pytest.raises(cni.CNIError, match=needle):
        cni.parse_config(raw)


def test_missing_plugin_is_reported(tmp_path: Path) -> None:
    with pytest.raises(cni.CNIError, match="'nope' not found"):
        cni.find_plugin("nope", [tmp_path])


def test_result_ipv4_picks_the_container_interface() -> None:
    result = {
        "interfaces": [{"name": "vp0"}, {"name": "veth1"}, {"name": "eth0", "sandbox": "/var/run/netns/x"}],
        "ips": [{"address": "fd00::2/64", "interface": 2}, {"address": "10.244.0.1/24", "interface": 0},
                {"address": "10.244.0.7/24", "interface": 2}],
    }  # fmt: skip
    assert cni.result_ipv4(result) == "10.244.0.7"
    assert cni.result_ipv4({"ips": [{"address": "10.1.0.3/16"}]}) == "10.1.0.3"  # 0.4.0 without interfaces
    assert cni.result_ipv4({}) is None


def test_default_chain_is_bridge_and_host_local(tmp_path: Path) -> None:
    conf = cni.parse_config(pod.default_conflist("10.244.3.0/24", tmp_path))
    (bridge,) = conf["plugins"]
    assert bridge["type"] == "bridge" and bridge["bridge"] == "vp0" and bridge["isGateway"]
    assert bridge["ipam"]["type"] == "host-local" and bridge["ipam"]["ranges"] == [[{"subnet": "10.244.3.0/24"}]]
    assert bridge["ipam"]["dataDir"] == str(tmp_path / "ipam")
    with pytest.raises(ValueError):
        pod.default_conflist("10.244.3.1/24", tmp_path)  # host bits set: not a subnet


def test_nat_forwards_listed_ports_only() -> None:
    rules = pod.nft_rules("10.244.0.5", [("TCP", 80), ("TCP", 22), ("UDP", 53)])
    assert 'iifname "eth0" tcp dport { 22, 80 } dnat to 10.0.2.2' in rules
    assert 'iifname "eth0" udp dport { 53 } dnat to 10.0.2.2' in rules
    assert 'ip saddr 10.0.2.2 oifname "eth0" masquerade' in rules
    assert "l4proto" not in rules


def test_nat_forwards_everything_without_ports() -> None:
    rules = pod.nft_rules("10.244.0.5", [])
    assert 'iifname "eth0" meta l4proto { tcp, udp, sctp } dnat to 10.0.2.2' in rules


def test_interface_ports_default_to_tcp() -> None:
    assert pod.interface_ports({"ports": [{"port": 8080}, {"port": 53, "protocol": "UDP"}]}) == [
        ("TCP", 8080), ("UDP", 53)]  # fmt: skip


def test_netns_name_is_short_and_stable() -> None:
    assert pod.netns_name("9b3a5b38-1fee-449b-9a60-df5dc4c2d7e9") == "vp-9b3a5b38"


def _vmi(uid: str = "u-1") -> dict[str, Any]:
    return {
        "metadata": {"uid": uid},
        "spec": {"domain": {"devices": {"interfaces": [{"name": "default", "masquerade": {}}]}},
                 "networks": [{"name": "default", "pod": {}}]},
    }  # fmt: skip


def test_user_mode_stays_the_default(tmp_path: Path) -> None:
    network.configure_pod_network("user", tmp_path)
    att = network.attachments(_vmi())["default"]
    assert att.kind == "user"
    assert network.pod_ip("u-1") is None


async def test_cni_mode_hands_qemu_the_prepared_tap_fd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    network.configure_pod_network("cni", tmp_path)
    try:
        with pytest.raises(network.NetworkSetupError, match="not set up"):
            network.attachments(_vmi())  # never silently falls back to user mode on a CNI node
        r, w = os.pipe()

        async def fake_setup(self: pod.PodNetwork, uid: str, ports: Any = (), dns_search: Any = (),
                             binding: str = "masquerade") -> pod.PodAttachment:
            assert binding == "masquerade"
            return pod.PodAttachment(uid=uid, netns="vp-u1", pod_ip="10.244.0.9", tap_fd=r)

        monkeypatch.setattr(pod.PodNetwork, "setup", fake_setup)
        await network.prepare(_vmi())
        att = network.attachments(_vmi())["default"]
        assert att.kind == "fd" and att.fd == r
        network.release("u-1")
        with pytest.raises(OSError):
            os.fstat(r)  # our copy is closed once QEMU has it
        os.close(w)
    finally:
        network.configure_pod_network("user", tmp_path)


async def test_cni_setup_failure_is_a_network_setup_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    network.configure_pod_network("cni", tmp_path)
    try:
        async def failing(self: pod.PodNetwork, uid: str, ports: Any = (), dns_search: Any = (),
                          binding: str = "masquerade") -> pod.PodAttachment:
            raise pod.PodNetworkError("pod network: CNI plugin bridge ADD failed: boom")

        monkeypatch.setattr(pod.PodNetwork, "setup", failing)
        with pytest.raises(network.NetworkSetupError, match="bridge ADD failed: boom"):
            await network.prepare(_vmi())
    finally:
        network.configure_pod_network("user", tmp_path)


async def test_passt_binding_hands_qemu_passts_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vmi = _vmi()
    iface = vmi["spec"]["domain"]["devices"]["interfaces"][0]
    iface.pop("masquerade", None)
    iface["binding"] = {"name": "passt"}  # the plugin spelling; passtBinding: {} is the core one
    with pytest.raises(network.NetworkSetupError, match="passt binding needs the CNI pod network"):
        network.attachments(vmi)  # user mode: refused, not silently something else
    network.configure_pod_network("cni", tmp_path)
    try:
        async def fake_setup(self: pod.PodNetwork, uid: str, ports: Any = (), dns_search: Any = (),
                             binding: str = "masquerade") -> pod.PodAttachment:
            assert binding == "passt"
            return pod.PodAttachment(uid=uid, netns="vp-u1", pod_ip="10.244.0.9", tap_fd=None, socket="/run/x.sock")

        monkeypatch.setattr(pod.PodNetwork, "setup", fake_setup)
        await network.prepare(vmi)
        att = network.attachments(vmi)["default"]
        assert att.kind == "stream" and att.socket_path == "/run/x.sock"
        from virtplane.hypervisor.devices.interfaces import plan_nic

        nd = plan_nic(iface, att, mac_seed="s").netdev
        assert nd["type"] == "stream" and nd["addr"] == {"type": "unix", "path": "/run/x.sock"} and not nd["server"]
    finally:
        await network.teardown("u-1")
        network.configure_pod_network("user", tmp_path)
