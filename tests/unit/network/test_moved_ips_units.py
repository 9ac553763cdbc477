"""A live-migrated VMI keeps its pod IP: which IPs are announced as /32s, the target's NAT, the kept DEL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from virtplane.network import cni, pod
from virtplane.node.routes import moved_ips


def node(name: str, cidr: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"podCIDR": cidr}}


def launcher(name: str, node_name: str, ip: str, phase: str = "Running", created: str = "2026-01-01T00:00:00Z",
             host_ip: str = "10.224.0.11") -> dict[str, Any]:  # fmt: skip
    return {"metadata": {"name": name, "creationTimestamp": created}, "spec": {"nodeName": node_name},
            "status": {"phase": phase, "podIP": ip, "hostIP": host_ip}}  # fmt: skip


NODES = [node("n1", "10.244.1.0/24"), node("n2", "10.244.2.0/24")]


def test_a_pod_ip_at_home_is_not_announced() -> None:
    assert moved_ips(NODES, [launcher("a", "n1", "10.244.1.5")]) == {}


def test_a_pod_ip_away_from_home_goes_to_its_node() -> None:
    assert moved_ips(NODES, [launcher("a", "n2", "10.244.1.5")]) == {"10.244.1.5": "n2"}


def test_the_newest_running_launcher_wins_and_finished_ones_never_count() -> None:
    src = launcher("src", "n1", "10.244.1.5", created="2026-01-01T00:00:00Z")
    dst = launcher("dst", "n2", "10.244.1.5", created="2026-01-01T00:05:00Z")
    assert moved_ips(NODES, [src, dst]) == {"10.244.1.5": "n2"}  # the migration completed: the target runs it
    back = launcher("back", "n1", "10.244.1.5", created="2026-01-01T00:09:00Z")
    assert moved_ips(NODES, [dst, back]) == {}  # home again
    pending = launcher("next", "n1", "10.244.1.5", phase="Pending", created="2026-01-01T00:09:00Z")
    assert moved_ips(NODES, [dst, pending]) == {"10.244.1.5": "n2"}


def test_node_addresses_and_foreign_ips_are_not_pod_ips() -> None:
    assert moved_ips(NODES, [launcher("a", "n2", "10.224.0.11"), launcher("b", "n2", "192.168.9.9")]) == {}


def test_a_migration_target_snats_the_guest_to_the_kept_ip() -> None:
    assert 'oifname "eth0" snat to 10.244.1.5' in pod.nft_rules("10.244.1.5", [], snat=True)
    assert 'oifname "eth0" masquerade' in pod.nft_rules("10.244.1.5", [])


def test_a_kept_ip_is_deleted_without_its_ipam() -> None:
    conf = cni.parse_config(pod.default_conflist("10.244.1.0/24", Path("/x")))
    kept = cni.without_ipam(conf)
    assert kept["plugins"][0]["ipam"] == {"type": "static"} and kept["plugins"][0]["bridge"] == "vp0"
    assert conf["plugins"][0]["ipam"]["type"] == "host-local"  # the original is untouched
