"""The API server's graceful pod deletion rules (apiserver/podgrace.py), as kube-apiserver's pod strategy."""

from __future__ import annotations

import datetime
from typing import Any

from virtplane.apiserver import podgrace


class Objects:
    """What pending_deletion uses of the ObjectStore: the nodes resource and a read."""

    def __init__(self, nodes: list[str]) -> None:
        self.nodes = nodes
        self.registry = self

    def lookup(self, group: str, version: str, plural: str) -> str | None:
        return "nodes" if (group, version, plural) == ("", "v1", "nodes") else None

    async def try_get(self, res: str, namespace: str | None, name: str) -> dict | None:
        return {"metadata": {"name": name}} if res == "nodes" and name in self.nodes else None


def pod(node: str = "n1", grace: int | None = None, phase: str = "Running", **meta: Any) -> dict:
    spec: dict[str, Any] = {"nodeName": node} if node else {}
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    return {"metadata": {"name": "p", "namespace": "default", "uid": "u", **meta}, "spec": spec,
            "status": {"phase": phase}}  # fmt: skip


def seconds_until(ts: str) -> float:
    at = datetime.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    return (at - datetime.datetime.now(datetime.UTC)).total_seconds()


async def test_bound_pod_gets_deletion_timestamp_and_grace() -> None:
    objs = Objects(["n1"])
    out = await podgrace.pending_deletion(objs, pod(), {})  # type: ignore[arg-type]
    assert out is not None and out["metadata"]["deletionGracePeriodSeconds"] == 30
    assert 28 <= seconds_until(out["metadata"]["deletionTimestamp"]) <= 31
    out = await podgrace.pending_deletion(objs, pod(grace=7), {})  # type: ignore[arg-type]
    assert out is not None and out["metadata"]["deletionGracePeriodSeconds"] == 7
    out = await podgrace.pending_deletion(objs, pod(grace=7), {"gracePeriodSeconds": "12"})  # type: ignore[arg-type]
    assert out is not None and out["metadata"]["deletionGracePeriodSeconds"] == 12
    out = await podgrace.pending_deletion(objs, pod(grace=7), {"gracePeriodSeconds": -5})  # type: ignore[arg-type]
    assert out is not None and out["metadata"]["deletionGracePeriodSeconds"] == 1


async def test_removed_at_once() -> None:
    objs = Objects(["n1"])
    for p, options in [
        (pod(), {"gracePeriodSeconds": 0}),  # --grace-period=0 --force
        (pod(node=""), {}),  # never scheduled
        (pod(phase="Succeeded"), {}),
        (pod(phase="Failed"), {}),
        (pod(node="gone"), {}),  # its node does not exist
        (pod(labels={"kubevirt.io": "virt-launcher"}), {}),  # a VM's pod
    ]:
        assert await podgrace.pending_deletion(objs, p, options) is None, p  # type: ignore[arg-type]


async def test_pending_deletion_may_only_be_shortened() -> None:
    objs = Objects(["n1"])
    first = await podgrace.pending_deletion(objs, pod(), {})  # type: ignore[arg-type]
    assert first is not None
    # again without options, or with a longer grace: unchanged (the same object: nothing to write)
    assert await podgrace.pending_deletion(objs, first, {}) is first  # type: ignore[arg-type]
    assert await podgrace.pending_deletion(objs, first, {"gracePeriodSeconds": 60}) is first  # type: ignore[arg-type]
    shorter = await podgrace.pending_deletion(objs, first, {"gracePeriodSeconds": 5})  # type: ignore[arg-type]
    assert shorter is not None and shorter["metadata"]["deletionGracePeriodSeconds"] == 5
    assert 3 <= seconds_until(shorter["metadata"]["deletionTimestamp"]) <= 6
    # and 0 removes it now (the node agent's final delete)
    assert await podgrace.pending_deletion(objs, shorter, {"gracePeriodSeconds": 0}) is None  # type: ignore[arg-type]
