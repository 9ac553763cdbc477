"""`virtplane up --nodes N` puts each node agent in its own network namespace by default when N > 1 (root)."""

from __future__ import annotations

import pytest

from virtplane.cli import nodes


def test_several_nodes_get_namespaces_by_default_as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nodes.os, "geteuid", lambda: 0)
    assert nodes.use_node_netns(3, None) is True
    assert nodes.use_node_netns(1, None) is False  # one node: nothing to cross
    assert nodes.use_node_netns(3, False) is False  # --no-node-netns
    assert nodes.use_node_netns(1, True) is True


def test_without_root_the_agents_share_the_host_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nodes.os, "geteuid", lambda: 1000)
    assert nodes.use_node_netns(3, None) is False
