"""PodNetwork against the real CNI plugins, dnsmasq and nftables, without a VM: what setup builds in the
netns, that teardown removes all of it and releases the IP, and that a failed ADD leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.network.conftest import network_requirements
from virtplane.network import netns, pod

BRIDGE = "vphost0"
CIDR = "10.244.98.0/24"


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


def is_dnsmasq(pid: int) -> bool:
    try:
        return b"dnsmasq" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.fixture
def pn(tmp_path: Path) -> Iterator[pod.PodNetwork]:
    network_requirements()
    conf = tmp_path / "pod.conflist"
    conf.write_text(json.dumps(pod.default_conflist(CIDR, tmp_path, bridge=BRIDGE)))
    yield pod.PodNetwork(tmp_path, conf_file=conf)
    for state in (tmp_path / "pods").glob("*.json"):
        asyncio.run(pod.PodNetwork(tmp_path, conf_file=conf).teardown(state.stem))
    subprocess.run(["ip", "link", "delete", BRIDGE], check=False, capture_output=True)


async def test_setup_and_teardown(pn: pod.PodNetwork, tmp_path: Path) -> None:
    uid = "11111111-aaaa-bbbb-cccc-000000000001"
    att = await pn.setup(uid, [("TCP", 22)])
    try:
        ns = att.netns
        assert ns == pn.netns_for(uid) and ns.startswith(pod.netns_name(uid) + "-")
        assert att.pod_ip.startswith("10.244.98.") and pn.pod_ip(uid) == att.pod_ip
        assert f"{att.pod_ip}/24" in sh("ip", "-n", ns, "-4", "addr", "show", "eth0")
        assert "10.0.2.1/24" in sh("ip", "-n", ns, "-4", "addr", "show", pod.BRIDGE)
        assert f"master {pod.BRIDGE}" in sh("ip", "-n", ns, "link", "show", pod.TAP)
        rules = sh(*netns.in_netns(ns, ["nft", "list", "ruleset"]))
        assert "tcp dport 22 dnat to 10.0.2.2" in rules and "masquerade" in rules
        state = json.loads((tmp_path / "pods" / f"{uid}.json").read_text())
        assert is_dnsmasq(state["dnsmasqPid"])
        assert (tmp_path / "ipam" / "virtplane-pod" / att.pod_ip).exists()
    finally:
        assert att.tap_fd is not None
        os.close(att.tap_fd)
    assert await pn.teardown(uid) == []
    assert not netns.exists(pn.netns_for(uid))
    assert not (tmp_path / "ipam" / "virtplane-pod" / att.pod_ip).exists()
    assert not is_dnsmasq(state["dnsmasqPid"])
    assert await pn.teardown(uid) == []  # idempotent


async def test_failed_add_leaves_nothing_and_the_bridge_still_works(pn: pod.PodNetwork, tmp_path: Path) -> None:
    assert pn.conf_file is not None
    good = pn.conf_file.read_text()
    bad = json.loads(good)
    bad["plugins"][0]["ipam"]["ranges"] = [[{"subnet": "10.244.98.0/40"}]]
    pn.conf_file.write_text(json.dumps(bad))
    uid = "11111111-aaaa-bbbb-cccc-000000000002"
    with pytest.raises(pod.PodNetworkError, match="invalid CIDR"):
        await pn.setup(uid)
    assert not netns.exists(pn.netns_for(uid))
    assert not list((tmp_path / "pods").glob(f"{uid}*"))
    # The failed ADD left the bridge without ports (all-zero MAC): the next pod must still come up.
    pn.conf_file.write_text(good)
    att = await pn.setup(uid)
    assert att.tap_fd is not None
    os.close(att.tap_fd)
    assert await pn.teardown(uid) == []
